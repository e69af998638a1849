# LoRA conditioning (TMLR 2024) as patches over the official upstreams. `make help` lists the targets.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
GPUS    ?= 1
VARIANT ?= with-lora
SMOKE   ?=
DRY     ?=
TRAIN_FLAGS ?=
NANO_EPOCHS ?= 25
NANO_SEEDS ?= 0 1
NANO_OUT ?= runs/nano-compare
NANO_SAMPLES ?= 128
DEMO_EPOCHS ?= 8
FFHQ_ZIP ?=
FFHQ_SHA256 ?=
IMAGENET64_ZIPS ?=
IMAGENET64_SHA256 ?=

# One paper row: data (unless SMOKE), then train / generate / FID in vendor/edm with the paper's flags.
EDM_ROW = $(PY) tools/edm_paper.py $(1) --variant=$(VARIANT) --gpus=$(GPUS) $(if $(SMOKE),--smoke) $(if $(DRY),--dry-run) --train-flags="$(TRAIN_FLAGS)"
IDDPM_ROW = $(PY) tools/iddpm_paper.py $(1) --variant=$(VARIANT) --gpus=$(GPUS) $(if $(SMOKE),--smoke) $(if $(DRY),--dry-run) --train-flags="$(TRAIN_FLAGS)"

.PHONY: nano-compare data-mnist
.PHONY: help setup vendor vendor-edm vendor-iddpm vendor-dataflowr test smoke demo params audit bench patches \
        edm-cifar-uncond edm-cifar-cond edm-ffhq data-cifar10 data-ffhq \
        iddpm-cifar-uncond iddpm-cifar-cond iddpm-imagenet64 data-cifar10-folder data-imagenet64

help:
	@echo "make demo                 nano diffusion with UC-LoRA on real MNIST digits, on the CPU (about 6 minutes)"
	@echo "make test                 the test suite (CPU; builds the environment and vendor/ first)"
	@echo "make edm-cifar-uncond     paper row; also edm-cifar-cond, edm-ffhq"
	@echo "                          VARIANT=baseline|only-lora|with-lora|pretrained GPUS=N SMOKE=1 DRY=1 TRAIN_FLAGS=..."
	@echo "make iddpm-cifar-uncond   paper row; also iddpm-cifar-cond, iddpm-imagenet64"
	@echo "                          VARIANT=baseline|only-lora|with-lora GPUS=N SMOKE=1 DRY=1 TRAIN_FLAGS=..."
	@echo "make smoke                every paper target with SMOKE=1"
	@echo "make nano-compare         paper Fig. 3 and 4 on MNIST: shift vs TimeLoRA vs UC-LoRA (NANO_EPOCHS NANO_SEEDS NANO_SAMPLES NANO_OUT)"
	@echo "make params               parameter counts of the paper's rows: paper vs ours"
	@echo "make audit                what the patches change in each upstream"
	@echo "make bench                CPU micro-benchmark: LoRA attention block vs baseline block"
	@echo "make vendor [REBUILD=1]   fetch, patch and overlay the upstreams into vendor/"
	@echo "make patches U=edm        write edited vendor/<U> commits back to patches/<U>/"

# ---------------------------------------------------------------------------- set-up

setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

vendor: vendor-edm vendor-iddpm vendor-dataflowr
vendor-edm: setup
	$(PY) tools/vendor.py edm --pristine $(if $(REBUILD),--rebuild)
vendor-iddpm: setup
	$(PY) tools/vendor.py iddpm --pristine $(if $(REBUILD),--rebuild)
vendor-dataflowr: setup
	$(PY) tools/vendor.py dataflowr --pristine $(if $(REBUILD),--rebuild)

patches: setup
	$(PY) tools/export_patches.py $(U)

# ---------------------------------------------------------------------------- checks

test: setup vendor
	$(PY) -m pytest -q tests

params: setup vendor
	$(PY) tools/params.py

audit: setup
	$(PY) tools/audit.py

bench: setup vendor
	$(PY) tools/bench_edm.py

# ---------------------------------------------------------------------------- paper rows (EDM)

demo: setup vendor
	cd vendor/dataflowr && ../../$(PY) nano.py --cond uclora --data mnist5k --epochs $(DEMO_EPOCHS) --samples 64 --out $(CURDIR)/runs/demo

nano-compare: setup vendor
	$(PY) tools/nano_compare.py --epochs $(NANO_EPOCHS) --seeds $(NANO_SEEDS) --samples $(NANO_SAMPLES) --out $(NANO_OUT)

smoke: setup vendor
	$(MAKE) --no-print-directory edm-cifar-uncond edm-cifar-cond edm-ffhq SMOKE=1 VARIANT=with-lora
	$(MAKE) --no-print-directory edm-cifar-uncond SMOKE=1 VARIANT=only-lora
	$(MAKE) --no-print-directory edm-cifar-uncond SMOKE=1 VARIANT=baseline
	$(MAKE) --no-print-directory iddpm-cifar-uncond iddpm-cifar-cond iddpm-imagenet64 SMOKE=1 VARIANT=with-lora
	$(MAKE) --no-print-directory iddpm-cifar-cond SMOKE=1 VARIANT=only-lora
	$(MAKE) --no-print-directory iddpm-cifar-cond SMOKE=1 VARIANT=baseline

edm-cifar-uncond: setup vendor-edm $(if $(SMOKE)$(DRY),,datasets/cifar10-32x32.zip)
	$(call EDM_ROW,cifar10-uncond)
edm-cifar-cond: setup vendor-edm $(if $(SMOKE)$(DRY),,datasets/cifar10-32x32.zip)
	$(call EDM_ROW,cifar10-cond)
edm-ffhq: setup vendor-edm $(if $(SMOKE)$(DRY),,datasets/ffhq-64x64.zip)
	$(call EDM_ROW,ffhq64)

# ---------------------------------------------------------------------------- paper rows (IDDPM)

iddpm-cifar-uncond: setup vendor $(if $(SMOKE)$(DRY),,datasets/cifar10-train)
	$(call IDDPM_ROW,cifar10-uncond)
iddpm-cifar-cond: setup vendor $(if $(SMOKE)$(DRY),,datasets/cifar10-train)
	$(call IDDPM_ROW,cifar10-cond)
iddpm-imagenet64: setup vendor $(if $(SMOKE)$(DRY),,datasets/imagenet64-train)
	$(call IDDPM_ROW,imagenet64)

# ---------------------------------------------------------------------------- data

data-cifar10: datasets/cifar10-32x32.zip
datasets/cifar10-32x32.zip: | setup vendor-edm
	$(PY) tools/fetch_data.py cifar10 --dest=downloads/cifar-10-python.tar.gz
	cd vendor/edm && ../../$(PY) dataset_tool.py --source=$(CURDIR)/downloads/cifar-10-python.tar.gz --dest=$(CURDIR)/$@.partial.zip
	mv $@.partial.zip $@

data-ffhq: datasets/ffhq-64x64.zip
datasets/ffhq-64x64.zip: | setup vendor-edm
	$(PY) tools/fetch_data.py ffhq --source="$(FFHQ_ZIP)" $(if $(FFHQ_SHA256),--sha256=$(FFHQ_SHA256))
	cd vendor/edm && ../../$(PY) dataset_tool.py --source="$(abspath $(FFHQ_ZIP))" --dest=$(CURDIR)/$@.partial.zip --resolution=64x64
	mv $@.partial.zip $@

# improved-diffusion reads image folders: <class>_<index>.png
data-cifar10-folder: datasets/cifar10-train
datasets/cifar10-train: | setup
	$(PY) tools/fetch_data.py cifar10 --dest=downloads/cifar-10-python.tar.gz
	$(PY) tools/image_folder.py cifar10 downloads/cifar-10-python.tar.gz $@

data-imagenet64: datasets/imagenet64-train
datasets/imagenet64-train: | setup
	$(PY) tools/fetch_data.py imagenet64 $(foreach zip,$(IMAGENET64_ZIPS),--source="$(zip)") $(foreach sum,$(IMAGENET64_SHA256),--sha256=$(sum))
	$(PY) tools/image_folder.py imagenet64 $(IMAGENET64_ZIPS) $@

# The official MNIST files, for nano.py --data downloads/mnist (offline: --data mnist5k)
data-mnist: downloads/mnist/train-images-idx3-ubyte.gz
downloads/mnist/train-images-idx3-ubyte.gz: | setup
	$(PY) tools/fetch_data.py mnist --dest=downloads/mnist
