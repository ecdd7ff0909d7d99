#!/usr/bin/env bash
# Build the lowest-supported-transformers venv for `make test-lowest`: a venv that sees every package of the main
# venv BASE (one .pth line) but holds its own transformers (pyproject's lower bound) and the hub client that
# release needs, so it costs two small downloads instead of a second torch.
set -euo pipefail
lowest="$1" base="$2" spec="$3"
python3 -m venv "$lowest"
base_site=$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
own_site=$("$lowest/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$base_site')" > "$own_site/zz_lmcompress_base_venv.pth"
"$lowest/bin/python" -m pip --disable-pip-version-check -q install "transformers==$spec" "huggingface-hub>=1.5,<2"
"$lowest/bin/python" -c "import transformers; assert transformers.__version__.startswith('${spec%.*}'), transformers.__version__"
