# `make test`: create/refresh .venv, install guidewrap with the dev extra, lint, run the tests.
# `make demo`: same set-up, then the offline demo. Both are idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.guidewrap-installed

.PHONY: test demo lint wheel-check docs docs-check data

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check guidewrap tests bench examples
	$(PY) -m ruff format --check guidewrap tests bench examples

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/guidewrap demo

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d build/site  # not quiet: every warning is shown, and fails the build

wheel-check: $(STAMP)
	rm -rf build/wheel && $(PY) -m pip wheel -q --no-deps . -w build/wheel
	$(PY) .ci/wheel_check.py build/wheel

# Fashion-MNIST for the image experiments (examples/fashion_mnist.py): Debian's offline copy.
# Only the image study needs it; nothing else in the project needs a system package.
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	@ls /usr/share/datasets/fashion-mnist/*.gz

# Headless Chromium loads the built results page and fails if an image does not load (not run in CI).
docs-check: docs
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	bash .ci/docs-check build/site results/index.html
