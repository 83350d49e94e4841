#!/usr/bin/env bash
# The benchmark's GPU rows (run_benchmark.CUDA_ROWS) on a lent GPU machine, within one session's device time.
#
# That machine has PyTorch but not tyro or pytorch-fid, and no ../shared; a call carries at most 64 MiB, less than
# the Inception weights. So the files travel in two calls, made back to back (a machine goes back when idle):
#   here:   bash benchmark/gpu_session.sh prepare     -> .gpu/a (wheels, MNIST+USPS, weights part 1), .gpu/b (part 2)
#   call 1: bash benchmark/gpu_session.sh stage       (carry .gpu/a) installs under /tmp/cleangan, trains the digit
#           classifiers once, and measures how many training processes the GPU runs side by side (MPS or not)
#   call 2: bash benchmark/gpu_session.sh run SECONDS JOBS MPS (carry .gpu/b; JOBS and MPS 0/1 from the probe) checks the weights against shared/SHA256SUMS,
#           runs the rows for SECONDS at most, and returns finished runs (metrics.json, log, last sample grid) as
#           $OUT/gpu_runs.tgz; unpack it into benchmark/work here, then python benchmark/report.py.
# Runs still going at the deadline are lost (their checkpoints stay there); the runner's order puts wanted rows first.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/cleangan
export PYTHONPATH=$STAGE/site CLEANGAN_CACHE=$STAGE/cache PYTHONUNBUFFERED=1
WEIGHTS=pt_inception-2015-12-05-pool3.pth

prepare() {  # here, with network access to the package index and ../shared beside the checkout
    grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >>.git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/a/whl .gpu/b
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/a/whl \
        tyro docstring-parser typeguard shtab typing-extensions pytorch-fid==0.3.0
    tar -C ../shared -czf .gpu/a/data.tgz data/MNIST data/USPS
    split -b 44000000 "../shared/weights/$WEIGHTS" .gpu/a/weights.part.
    mv .gpu/a/weights.part.ab .gpu/b/
    cp ../shared/SHA256SUMS .gpu/b/
    # provenance without git there: the commit, and every tracked file's hash to show the tree is that commit's
    git rev-parse HEAD >.gpu/b/COMMIT
    git diff --quiet HEAD && git ls-files -z | xargs -0 sha256sum >.gpu/b/TREE.sha256
    du -sh .gpu/a .gpu/b
}

probe() {  # generator steps per second of vanilla_gan's nets, N processes side by side
    local n=$1 label=$2
    for i in $(seq "$n"); do
        python3 - >"$STAGE/probe_$label.$i" 2>&1 <<'EOF' &
import time, torch
from vanilla_gan import Discriminator, Generator, discriminator_loss, generator_loss
device = torch.device("cuda")
generator, discriminator = Generator(100).to(device), Discriminator().to(device)
optimizer_g = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.5, 0.999), fused=True)
optimizer_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.5, 0.999), fused=True)
real = torch.rand(64, 1, 28, 28, device=device) * 2 - 1
def step():
    fake = generator(torch.randn(64, 100, device=device))
    real_logits, fake_logits = discriminator(torch.cat([real, fake.detach()])).split(64)
    optimizer_d.zero_grad(set_to_none=True); discriminator_loss(real_logits, fake_logits).backward(); optimizer_d.step()
    discriminator.requires_grad_(False)
    optimizer_g.zero_grad(set_to_none=True); generator_loss(discriminator(fake)).backward(); optimizer_g.step()
    discriminator.requires_grad_(True)
for _ in range(200):
    step()
torch.cuda.synchronize()
start, steps = time.time(), 0
while time.time() - start < 6:
    for _ in range(50):
        step()
    steps += 50
torch.cuda.synchronize()
print(steps / (time.time() - start))
EOF
    done
    wait
    cat "$STAGE"/probe_"$label".* | python3 -c "import sys; r=[float(x) for x in sys.stdin if x.strip()[:1].isdigit()]; print('$label', len(r), 'procs', round(sum(r)), 'steps/s in all', round(min(r) if r else 0), 'per process')" | tee -a "$STAGE/probe.txt"
}

stage() {
    rm -rf "$STAGE" && mkdir -p "$STAGE/site" "$STAGE/cache" "$STAGE/weights"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
    lscpu | grep -m1 "Model name"
    echo "git: $(command -v git || echo none); mps: $(command -v nvidia-cuda-mps-control || echo none)"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$STAGE/site" .gpu/a/whl/*.whl || exit 1
    tar -C "$STAGE" -xzf .gpu/a/data.tgz && cp .gpu/a/weights.part.* "$STAGE/weights/" || exit 1
    python3 -c "
import torch, eval_fid
for dataset in ('MNIST', 'USPS'):  # trained once here, not by every run at once
    eval_fid.load_or_train_classifier(dataset, '$STAGE/data', '$STAGE/cache', torch.device('cuda'))
print('classifiers cached')" || exit 1
    : >"$STAGE/probe.txt"
    probe 1 single
    probe 8 shared
    if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
        sleep 1
        probe 8 mps
        probe 14 mps14
    fi
}

run() {
    local seconds=$1 jobs=$2 mps=$3 started=$SECONDS
    cp .gpu/b/weights.part.* "$STAGE/weights/" || exit 1
    cat "$STAGE"/weights/weights.part.* >"$STAGE/weights/$WEIGHTS"
    (cd "$STAGE" && grep " weights/$WEIGHTS" "$OLDPWD/.gpu/b/SHA256SUMS" | sha256sum -c -) || exit 1
    export CLEANGAN_GIT_COMMIT=$(cat .gpu/b/COMMIT)
    sha256sum --quiet -c .gpu/b/TREE.sha256 && export CLEANGAN_GIT_DIRTY=0 || export CLEANGAN_GIT_DIRTY=1
    if [ "$mps" = 0 ] && command -v nvidia-cuda-mps-control >/dev/null; then echo quit | nvidia-cuda-mps-control; fi
    local work=$STAGE/work
    timeout --signal=INT "$seconds" python3 benchmark/run_benchmark.py --device cuda --jobs "$jobs" --work-dir "$work" \
        --data-dir "$STAGE/data" --inception-weights "$STAGE/weights/$WEIGHTS" --poll-seconds 2
    echo "runner stopped after $((SECONDS - started)) s"
    pkill -INT -f "$STAGE/data" ; sleep 2; pkill -KILL -f "$STAGE/data"
    python3 - "$work" "$OUT/gpu_runs.tgz" "$STAGE/probe.txt" <<'EOF'
import sys, tarfile
from pathlib import Path
work, out, probe = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
with tarfile.open(out, "w:gz") as tar:
    if probe.exists():
        tar.add(probe, "probe.txt")
    for seed_dir in sorted(work.glob("**/seed*")):
        for log in seed_dir.glob("log.txt"):
            tar.add(log, str(log.relative_to(work)))
        for run in seed_dir.glob("runs/*"):
            wanted = [*run.glob("metrics.json"), *run.glob("*.png")]
            grids = sorted(run.glob("samples_epoch*.png"))
            wanted = [p for p in wanted if not p.name.startswith("samples_epoch")] + grids[-1:]
            for path in wanted:
                tar.add(path, str(path.relative_to(work)))
        for metrics in seed_dir.glob("metrics.json"):  # the floor writes its own
            tar.add(metrics, str(metrics.relative_to(work)))
print("finished runs:", len(list(work.glob("**/metrics.json"))))
EOF
}

case "${1:-}" in
    prepare) prepare ;;
    stage) stage ;;
    run) run "${2:-540}" "${3:-8}" "${4:-1}" ;;
    *) echo "usage: bash benchmark/gpu_session.sh prepare|stage|run [SECONDS [JOBS [MPS 0|1]]]" >&2; exit 2 ;;
esac
