"""Run EDM2's train_edm2.py with the given arguments and save the training state it holds, twice.

    python edm2_train_capture.py OUT_DIR -- <train_edm2.py arguments>
    torchrun --nproc_per_node=2 edm2_train_capture.py OUT_DIR -- <train_edm2.py arguments>

OUT_DIR/first-step-rank<rank>.pt: the state at the first loss evaluation. By then training_loop() has
built the network, the optimizer and the EMA and loaded the newest checkpoint of the run folder (EDM2
resumes when the same command runs again), so it holds what the first step starts from.
OUT_DIR/end-rank<rank>.pt: the state when training has ended (EDM2 itself saves rank 0's only).
A state is what EDM2's checkpoints hold (torch_utils.distributed.CheckpointIO): the progress
counters, the network, the optimizer and the EMA, as state dicts.
"""

import os
import sys

import torch

import train_edm2
from torch_utils import distributed as dist
from training import training_loop


def main():
    out_dir, rank = sys.argv[1], os.environ.get('RANK', '0')
    train_args = sys.argv[sys.argv.index('--') + 1:]
    held = {}

    class CapturingCheckpointIO(dist.CheckpointIO):
        def __init__(self, **state_objs):
            super().__init__(**state_objs)
            held.update(state_objs)
    dist.CheckpointIO = CapturingCheckpointIO

    def save(moment):
        state = dict(progress=dict(held['state']), net=held['net'].state_dict(), optimizer=held['optimizer'].state_dict(), ema=held['ema'].state_dict())
        torch.save(state, os.path.join(out_dir, f'{moment}-rank{rank}.pt'))

    first_step_saved = False
    evaluate = training_loop.EDM2Loss.__call__
    def capturing_evaluate(self, *args, **kwargs):
        nonlocal first_step_saved
        if not first_step_saved:
            save('first-step')
            first_step_saved = True
        return evaluate(self, *args, **kwargs)
    training_loop.EDM2Loss.__call__ = capturing_evaluate

    train_edm2.cmdline(train_args, standalone_mode=False)
    if not first_step_saved:
        sys.exit('training ended without a loss evaluation')
    save('end')


# DataLoader workers are spawned: they import this file again and must not train.
if __name__ == '__main__':
    main()
