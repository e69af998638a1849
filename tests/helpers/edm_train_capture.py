"""Run EDM's train.py with the given arguments and save the training state it reached.

    python edm_train_capture.py first-step OUT.pt -- <train.py arguments>
    python edm_train_capture.py first-step-then-on OUT.pt -- <train.py arguments>
    torchrun --nproc_per_node=2 edm_train_capture.py end OUT-{rank}.pt -- <train.py arguments>

first-step: stop at the first loss evaluation. By then training_loop() has built the network,
applied --transfer or --resume and built the EMA and the optimizer, so OUT.pt holds all three
exactly as the first training step sees them.
first-step-then-on: save the same, then let training go on to its end (one process for both).
end: let training finish, then save this rank's network and optimizer state.
"""

import copy

import os
import sys

import torch

import dnnlib
import train
from torch_utils import misc


class FirstStep(Exception):
    pass


def main():
    until, out = sys.argv[1], sys.argv[2]
    train_args = sys.argv[sys.argv.index('--') + 1:]
    captured = {}

    construct = dnnlib.util.construct_class_by_name
    def capturing_construct(*args, class_name, **kwargs):
        obj = construct(*args, class_name=class_name, **kwargs)
        if class_name.startswith('training.networks.'):
            captured['net'] = obj
        elif class_name.startswith('torch.optim.'):
            captured['optimizer'] = obj
            if until == 'first-step-then-on': # the loop's first call, after --resume / --transfer (the loss is pickled: left alone)
                zero_grad = obj.zero_grad
                def save_then_zero_grad(*args, **kwargs):
                    if 'first' not in captured:
                        captured['first'] = copy.deepcopy(current_state())
                    return zero_grad(*args, **kwargs)
                obj.zero_grad = save_then_zero_grad
        elif class_name.startswith('training.loss.') and until == 'first-step':
            def stop(**_kwargs):
                raise FirstStep()
            return stop
        return obj
    dnnlib.util.construct_class_by_name = capturing_construct

    copy_params = misc.copy_params_and_buffers
    def capturing_copy(src_module, dst_module, require_all=False):
        if dst_module is not captured['net']:
            captured['ema'] = dst_module
        copy_params(src_module=src_module, dst_module=dst_module, require_all=require_all)
    misc.copy_params_and_buffers = capturing_copy

    def current_state():
        state = dict(net=captured['net'].state_dict(), optimizer=captured['optimizer'].state_dict())
        if 'ema' in captured:
            state['ema'] = captured['ema'].state_dict()
        return state

    try:
        train.main(train_args, standalone_mode=False)
        if until.startswith('first-step') and 'first' not in captured:
            sys.exit('training ended without a loss evaluation')
    except FirstStep:
        pass
    state = captured['first'] if until == 'first-step-then-on' else current_state()
    torch.save(state, out.format(rank=os.environ.get('RANK', '0')))


# DataLoader workers are spawned: they import this file again and must not train.
if __name__ == '__main__':
    main()
