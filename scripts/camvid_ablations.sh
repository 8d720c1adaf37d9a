#!/usr/bin/env bash
# The two CamVid tables of docs/results.md, from run folders, with the project's own commands.
#
#   scripts/camvid_ablations.sh inference <run>   # one DeepLab v3+ CamVid run: OS 16 vs 8,
#                                                 # + MS, + flip, + CRF (v2 values / searched)
#   scripts/camvid_ablations.sh seeds <CamVid root> [iterations]   # poly vs step, seeds 0-2
#
# inference: the run (experiment=camvid_deeplabv3plus_mobilenetv2) predicts at half
# resolution (eval.predictor.scales=[0.5]), so the multi-scale set is DeepLab v2's
# {0.5, 0.75, 1} of that scale: {0.25, 0.375, 0.5}. The CRF is searched on the first
# CRF_IMAGES (default 50) of the 101 val images (the papers: 100 of 1,449), then every
# setting is scored on all 101 (the search images included: say so beside the numbers).
# Each evaluation writes <run>/eval_<name>.json; scripts/inference_table.py lays them out.
# seeds: lr=poly,step x seed=0,1,2 at ITERS iterations (default 500) as one Hydra sweep;
# scripts/ablation_table.py aggregates it (mean +- std, count, poly - step +- its s.e.).
set -euo pipefail
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."

inference() {
    local run=$1 scales='eval.predictor.scales=[0.25,0.375,0.5]' one='eval.predictor.scales=[0.5]'
    $PY -m segtrain.evaluate run="$run" eval=whole "$one"
    $PY -m segtrain.evaluate run="$run" eval=whole eval.output_stride=8 "$one"
    $PY -m segtrain.evaluate run="$run" eval=msc "$scales"
    $PY -m segtrain.evaluate run="$run" eval=msc_flip "$scales"
    $PY -m segtrain.evaluate run="$run" eval=msc_crf "$scales"          # DeepLab v2's values
    local best
    best=$($PY scripts/crf_search.py run="$run" "$scales" --num-images "${CRF_IMAGES:-50}" \
        | tee "$run/crf_search.txt" | sed -n '/^crf:/,$p' | grep -E '^  (bi_w|bi_xy_std|bi_rgb_std):' \
        | sed -E 's/^  ([a-z_]+): (.*)$/eval.crf.\1=\2/')
    # shellcheck disable=SC2086  # one override per word
    $PY -m segtrain.evaluate run="$run" eval=msc_crf name=msc_crf_searched "$scales" $best
    $PY scripts/inference_table.py "$run"
}

seeds() {
    local root=$1 iters=${2:-500} sweep
    sweep=outputs/multirun/camvid_poly_vs_step_${iters}
    $PY -m segtrain -m experiment=camvid_deeplabv3plus_mobilenetv2 dataset.root="$root" \
        lr=poly,step seed=0,1,2 trainer.max_iters="$iters" hydra.sweep.dir="$sweep"
    $PY scripts/ablation_table.py "$sweep"
}

case ${1:-} in
    inference) inference "${2:?run folder}" ;;
    seeds) seeds "${2:?CamVid root}" "${3:-500}" ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
