"""Run EDM's fid.py (ref or calc) with a stand-in feature network in place of Inception-v3.

    STANDIN_WEIGHTS=W.npy python edm_fid_standin.py ref|calc <fid.py options>

fid.py downloads Inception-v3 at run time, which an offline machine cannot. Everything else is the
upstream's own code: the image loading, the statistics, the Frechet distance and the .npz files.
The stand-in maps an image to 2048 features: tanh(flatten(image / 255) @ W).
"""

import io
import os
import pickle
import sys

import numpy as np
import torch

import dnnlib
import fid


class StandInDetector(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.register_buffer('weights', torch.as_tensor(weights, dtype=torch.float64))

    def forward(self, images, return_features):
        assert return_features
        return torch.tanh(images.to(torch.float64).flatten(1) / 255 @ self.weights)


def main():
    detector = pickle.dumps(StandInDetector(np.load(os.environ['STANDIN_WEIGHTS'])))
    open_url = dnnlib.util.open_url
    def open_url_with_standin(url, *args, **kwargs):
        if 'inception' in url:
            return io.BytesIO(detector)
        return open_url(url, *args, **kwargs)
    dnnlib.util.open_url = open_url_with_standin
    fid.main(sys.argv[1:], standalone_mode=False)


# DataLoader workers are spawned: they import this file again and must not run fid.py.
if __name__ == '__main__':
    main()
