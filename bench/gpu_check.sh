#!/bin/bash
# The GPU checks of a session that is lent one, as one prepared script within a time budget (device time is short):
#   BUDGET=560 bash bench/gpu_check.sh        # results under /tmp/res, packed into $OUT/res.tgz when $OUT is set
# A: compile the Triton kernels (and torch.compile's references) for the benchmark shapes, four processes at once
#    (the compiles are CPU work; Triton's and Inductor's caches keep them for the timed runs);
# B: the `gpu` tests; C: bench/kernels.py (bf16); D: bench/device_rates.py; E: bench/step_fidelity.py --breakdown;
# F: bench/activation_memory.py (what the runtime keeps for backward against what the plan prices);
# R (first, ~20 s): bench/runtime_reserve.py (the memory held outside torch's allocator: DeviceSpec.runtime_reserve).
# SKIP=D (or any phase letters) leaves phases out, e.g. device rates already recorded for this GPU and torch.
# Each phase runs under its own cap, cut to what is left of BUDGET seconds, so a slow phase cannot starve the others.
# Copy the written .md / .json into bench/results/ with the machine's name and date (the files carry both).
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
PY=${PY:-python3}
R=/tmp/res
mkdir -p $R/warm
END=$(($(date +%s) + ${BUDGET:-560}))
cap() {
  local left=$((END - $(date +%s)))
  ((left < $1)) && echo $left || echo $1
}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  nproc
  $PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda)"
} >$R/env.txt 2>&1
cat $R/env.txt
skip() { [[ "${SKIP:-}" == *$1* ]] && echo "(skipped)"; }
echo "== R: runtime reserve $(date +%T)"
skip R || { timeout $(cap 60) $PY bench/runtime_reserve.py --out $R >$R/reserve.log 2>&1; echo "rc=$?" && cat $R/reserve.log; }
echo "== A: compile caches $(date +%T)"
T=$(cap 150)
for c in slot_attention vq vq_st msglam; do
  timeout $T $PY bench/kernels.py --cases $c --dtypes bf16 --impls triton compile --out $R/warm/$c >$R/warm/$c.log 2>&1 &
done
timeout $T $PY bench/kernels.py --check >$R/warm/check.log 2>&1 &
wait
for f in $R/warm/*.log; do echo "-- $f" && tail -n 3 $f; done
echo "== B: gpu tests $(date +%T)"
timeout $(cap 120) $PY -m pytest -q tests/test_gpu.py -rA --timeout 110 -s >$R/test_gpu.log 2>&1
echo "rc=$?" && grep -E "passed|failed|PASSED|FAILED|Error|profile mode" $R/test_gpu.log | tail -15
echo "== C: kernel benchmarks $(date +%T)"
timeout $(cap 200) $PY bench/kernels.py --dtypes bf16 --out $R >$R/kernels.log 2>&1
echo "rc=$?" && grep -E "\| (met|missed) \|" $R/kernels.log | tail -20
echo "== D: device rates $(date +%T)"
skip D || { timeout $(cap 100) $PY bench/device_rates.py --out $R >$R/rates.log 2>&1; echo "rc=$?" && tail -n 12 $R/rates.log; }
echo "== E: step fidelity $(date +%T)"
timeout $(cap 150) $PY bench/step_fidelity.py --steps 6 --breakdown --out $R >$R/step.log 2>&1
echo "rc=$?" && tail -n 10 $R/step.log
echo "== F: activation memory $(date +%T)"
timeout $(cap 60) $PY bench/activation_memory.py --out $R >$R/actmem.log 2>&1
echo "rc=$?" && tail -n 6 $R/actmem.log
echo "== done $(date +%T)"
[ -n "$OUT" ] && tar czf $OUT/res.tgz -C /tmp res
