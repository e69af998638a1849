"""Run improved-diffusion's scripts/image_train.py and save the training state it reached.

    python iddpm_train_capture.py first-step OUT.pt -- <image_train.py arguments>
    mpiexec -n 2 python iddpm_train_capture.py end OUT-{rank}.pt -- <image_train.py arguments>

first-step: stop before the first training step, once TrainLoop has loaded any checkpoint: OUT.pt
holds the model, optimizer and EMA state and the step counter as that step sees them.
end: let training finish, then save this rank's model state.
"""

import os
import runpy
import sys

import torch

from improved_diffusion.train_util import TrainLoop


def state_of(loop):
    return dict(model=loop.model.state_dict(), optimizer=loop.opt.state_dict(), resume_step=loop.resume_step,
                ema={rate: loop._master_params_to_state_dict(params) for rate, params in zip(loop.ema_rate, loop.ema_params)})


def main():
    until, out = sys.argv[1], sys.argv[2]
    out = out.format(rank=os.environ.get('PMI_RANK', os.environ.get('OMPI_COMM_WORLD_RANK', '0')))
    script = os.path.join(os.getcwd(), 'scripts', 'image_train.py')
    if until == 'first-step':
        def save_and_stop(loop, batch, cond):
            torch.save(state_of(loop), out)
            sys.exit(0)
        TrainLoop.run_step = save_and_stop
    else:
        run_loop = TrainLoop.run_loop
        def run_and_save(loop):
            run_loop(loop)
            torch.save(state_of(loop), out)
        TrainLoop.run_loop = run_and_save
    sys.argv = [script] + sys.argv[sys.argv.index('--') + 1:]
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
