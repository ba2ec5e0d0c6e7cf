#!/usr/bin/env bash
# timm's own model tests (pytorch-image-models' tests/test_models.py) over every cvt_* model, run by hand.
#
#   benchmarks/timm_suite.sh /path/to/pytorch-image-models [more pytest arguments, e.g. -k "cvt and not cvt_w24"]
#
# The checkout is timm's repository at the commit to test (the figure in docs/variants.md: aa4b585). Its test file
# gets the two list entries timm would add for a hierarchical ViT-like model: 'cvt' among the modules that have
# forward_intermediates and the getter feature wrapper (FEAT_INTER_FILTERS), 'cvt_*' among the models whose
# features are tokens (NON_STD_FILTERS); nothing else in it changes. `-p cvt` imports cvt as a pytest plugin before
# collection, which registers the cvt_* models with timm: no conftest, no other file. `python -m pytest` from the
# checkout puts the checkout's own timm first on sys.path, so this tests cvt against timm at that commit.
# HF_HUB_OFFLINE=1: test_model_load_pretrained fetches released weights from the Hub, which fails at once offline
# instead of after network timeouts.
set -euo pipefail

src=$(cd "${1:?give the path of a pytorch-image-models checkout}" && pwd)
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}

"$python" - "$src/tests/test_models.py" <<'EOF'
import pathlib, re, sys

path = pathlib.Path(sys.argv[1])
text = path.read_text()
for name, entry in (("FEAT_INTER_FILTERS", "'cvt'"), ("NON_STD_FILTERS", "'cvt_*'")):
    found = re.search(rf"^{name} = \[(.*?)\n\]", text, re.S | re.M)
    if found is None:
        sys.exit(f"{path}: no {name} list")
    if entry not in found.group(1):
        body = found.group(1).rstrip().rstrip(",")
        text = text[: found.start(1)] + body + f", {entry}," + text[found.end(1):]
path.write_text(text)
EOF

cd "$src"
echo "timm checkout: $(git rev-parse --short HEAD 2>/dev/null || echo '?'), cvt: $(git -C "$repo" rev-parse --short HEAD)"
HF_HUB_OFFLINE=1 exec "$python" -m pytest -p cvt tests/test_models.py -k cvt -q -rfEs -p no:cacheprovider "$@"
