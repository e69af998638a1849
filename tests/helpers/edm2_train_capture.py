"""Run EDM2's train_edm2.py with the given arguments and save the training state it holds.

    python edm2_train_capture.py first-step OUT.pt -- <train_edm2.py arguments>
    torchrun --nproc_per_node=2 edm2_train_capture.py end OUT-{rank}.pt -- <train_edm2.py arguments>

first-step: save the state at the first loss evaluation, then train on. By then training_loop() has
built the network, the optimizer and the EMA and loaded the newest checkpoint of the run folder (EDM2
resumes when the same command runs again), so OUT.pt holds what the first step starts from.
end: save this rank's state when training has ended (EDM2 itself saves rank 0's only).
The state is what EDM2's checkpoints hold (torch_utils.distributed.CheckpointIO): the progress
counters, the network, the optimizer and the EMA, as state dicts.
"""

import os
import sys

import torch

import train_edm2
from torch_utils import distributed as dist
from training import training_loop


def main():
    until, out = sys.argv[1], sys.argv[2].format(rank=os.environ.get('RANK', '0'))
    train_args = sys.argv[sys.argv.index('--') + 1:]
    held = {}

    class CapturingCheckpointIO(dist.CheckpointIO):
        def __init__(self, **state_objs):
            super().__init__(**state_objs)
            held.update(state_objs)
    dist.CheckpointIO = CapturingCheckpointIO

    def save():
        state = dict(progress=dict(held['state']), net=held['net'].state_dict(), optimizer=held['optimizer'].state_dict(), ema=held['ema'].state_dict())
        torch.save(state, out)

    evaluate = training_loop.EDM2Loss.__call__
    def capturing_evaluate(self, *args, **kwargs):
        if until == 'first-step' and not os.path.exists(out):
            save()
        return evaluate(self, *args, **kwargs)
    training_loop.EDM2Loss.__call__ = capturing_evaluate

    train_edm2.cmdline(train_args, standalone_mode=False)
    if until == 'end':
        save()
    elif not os.path.exists(out):
        sys.exit('training ended without a loss evaluation')


# DataLoader workers are spawned: they import this file again and must not train.
if __name__ == '__main__':
    main()
