#!/usr/bin/env bash
# One call on a machine with a GPU or TPU: the cell benchmark at flash-linear-attention's
# published shapes (B 1, T 8192, H 16 and 96, K = V = 128), in float32 and bfloat16 inputs, then
# the model benchmark; reports under OUT_DIR (default docs/benchmarks/device), and OUT_DIR/../
# DEVICE.md naming the device and linking them.
#
#   scripts/accelerator_bench.sh [--dry-run] [OUT_DIR]
#
# --dry-run prints the commands (one per line, each starting "fwpzoo bench") and runs nothing;
# the test suite runs it so on the CPU and parses every command's options.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
out="${1:-docs/benchmarks/device}"

commands=()
for heads in 16 96; do
    for dtype in float32 bfloat16; do
        commands+=("fwpzoo bench cells --forms recurrent,chunkwise --lengths 8192 --batch 1 --heads ${heads} --key-dim 128 --value-dim 128 --dtype ${dtype} --out ${out}/cells_h${heads}_${dtype}.md")
    done
done
commands+=("fwpzoo bench model --out ${out}/model")

if (( dry_run )); then
    printf '%s\n' "${commands[@]}"
    exit 0
fi

mkdir -p "${out}/model"
for command in "${commands[@]}"; do
    echo "+ ${command}" >&2
    ${command}
done

device=$(python -c "import jax; d = jax.devices()[0]; print(f'{jax.device_count()} x {d.device_kind} ({d.platform})')")
{
    echo "# Benchmarks on an accelerator"
    echo
    echo "Written by \`scripts/accelerator_bench.sh ${out}\` on ${device}, $(date -u +%Y-%m-%d)."
    echo
    for command in "${commands[@]}"; do
        report="${command##*--out }"
        [[ "${report}" == *.md ]] || report="${report}/model.md"
        echo "- \`${command}\`: [${report#docs/benchmarks/}](${report#docs/benchmarks/})"
    done
} > "$(dirname "${out}")/DEVICE.md"
