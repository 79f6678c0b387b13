#!/bin/bash
# A SLURM job that survives its time limit and preemption: sbatch configs/slurm.sh [CONFIG] [CHECKPOINT_DIR]
#
# 90 s before the time limit SLURM sends SIGUSR1 to every task (--signal=USR1@90); on preemption, SIGTERM.
# PreemptionCheckpoint (in the config's callbacks) finishes the optimizer step, writes
# CHECKPOINT_DIR/preempted.ckpt and exits; on SIGUSR1, rank 0 also runs `scontrol requeue` (Lightning's
# SLURMEnvironment has auto_requeue on). --requeue lets SLURM requeue the job after a preemption. Each
# start resumes from the newer of preempted.ckpt and ModelCheckpoint's last.ckpt, exactly where it stopped.
# One task per GPU: Lightning takes its ranks from srun. --signal=USR1@90 leaves 90 s for the rest of a step,
# a validation if one falls due there, and the save. The log folder must exist: mkdir -p runs.
#SBATCH --job-name=dpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%j.out

set -euo pipefail
CONFIG=${1:-configs/ddp.yaml}
CHECKPOINT_DIR=${2:-runs/ddp-hh/checkpoints}  # the config's ModelCheckpoint and PreemptionCheckpoint dirpath

RESUME=()
NEWEST=$(ls -t "$CHECKPOINT_DIR"/preempted.ckpt "$CHECKPOINT_DIR"/last.ckpt 2>/dev/null | head -n 1 || true)
if [ -n "$NEWEST" ]; then
    RESUME=(--ckpt_path "$NEWEST")
    echo "resuming from $NEWEST"
fi
# Exit code 138 (SIGUSR1) or 143 (SIGTERM): stopped with a checkpoint, and requeued where SLURM or rank 0 did.
srun dpo-lightning fit --config "$CONFIG" --trainer.num_nodes="$SLURM_JOB_NUM_NODES" "${RESUME[@]}"
