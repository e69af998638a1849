"""Download a dataset archive, or take one the user supplies, and verify its checksum.

    python -m tools.data.fetch cifar10 --dest=PATH        # download CIFAR-10 (python version), check MD5
    python -m tools.data.fetch mnist --dest=FOLDER        # download the four MNIST files, check MD5s
    python -m tools.data.fetch ffhq --source=PATH         # FFHQ: check your own copy (it needs a Google login)
    python -m tools.data.fetch imagenet64 --source=PART1 --source=PART2   # likewise (it needs an ImageNet login)
    python -m tools.data.fetch url --url=URL --dest=PATH [--sha256=HEX]  # any file, e.g. EDM's published networks

A file without a published checksum (EDM's networks) is checked against the SHA-256 recorded in
PATH.sha256 at its first download, or against --sha256 when given.

An existing --dest with the right checksum is kept; a partial download resumes; a wrong checksum is an
error that names the file; a download that fails (no network, a proxy, a server error) says which URL
failed and where to put a copy fetched by other means. Progress goes to stderr.
"""

import argparse
import hashlib
import os
import sys
import urllib.request

from tools.vendoring.run import interruptible

ARCHIVES = {
    'cifar10': dict(
        url='https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
        md5='c58f30108f718f92721af3b95e74349a', # published by the dataset's authors
    ),
    # MNIST's own site (yann.lecun.com) often refuses downloads; this is the mirror PyTorch uses, with
    # the MD5s of the original files.
    'mnist': dict(files=[
        ('https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz', 'f68b3c2dcbeaaa9fbdd348bbdeb94873'),
        ('https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz', 'd53e105ee54ea40749a09fcbcd1e9432'),
        ('https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz', '9fb629c4189551a2d022fa330f9573f3'),
        ('https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz', 'ec29112dd5afa0611ce80d1b7f02629c'),
    ]),
    'ffhq': dict(
        # FFHQ needs a Google account and is 89 GB: the user downloads images1024x1024 themselves,
        # with the official script (it checks each image's MD5 against ffhq-dataset-v2.json), and
        # zips it. No checksum of such a zip is published, so FFHQ_SHA256 is the user's own record.
        where='https://github.com/NVlabs/ffhq-dataset (python download_ffhq.py --images), then zip images1024x1024/',
    ),
    'url': dict(), # --url, --dest and maybe --sha256 say it all
    'imagenet64': dict(
        # Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017) needs an ImageNet account; no checksums
        # of its zips are published, so IMAGENET64_SHA256 is the user's own record.
        where='https://image-net.org/download-images.php ("Downsampled ImageNet 64x64": Imagenet64_train_part1_npz.zip and _part2_npz.zip)',
    ),
}


def digest(path, algorithm):
    h = hashlib.new(algorithm)
    size, done = os.path.getsize(path), 0
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
            done += len(chunk)
            print(f'\rchecking {os.path.basename(path)}: {100 * done // max(size, 1)}%', end='', file=sys.stderr)
    print(file=sys.stderr)
    return h.hexdigest()


def download(url, dest):
    partial = dest + '.partial'
    start = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={'Range': f'bytes={start}-'} if start else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if start and response.status != 206: # server ignored the range: start over
            start = 0
        total = start + int(response.headers.get('Content-Length', 0))
        with open(partial, 'ab' if start else 'wb') as f:
            done = start
            for chunk in iter(lambda: response.read(1 << 20), b''):
                f.write(chunk)
                done += len(chunk)
                print(f'\rdownloading {os.path.basename(dest)}: {done >> 20} / {total >> 20} MiB', end='', file=sys.stderr)
    print(file=sys.stderr)
    os.replace(partial, dest)


def download_or_exit(url, dest, checksum=None):
    """download(), or exit with one line: which URL failed and where a copy fetched elsewhere goes
    (checksum: what to check it against, e.g. "its MD5 is ...", where one is known)."""
    try:
        download(url, dest)
    except OSError as err: # urllib's URLError and HTTPError are OSErrors
        check = f'check that {checksum}, ' if checksum else ''
        sys.exit(f'fetch: downloading {url} failed ({getattr(err, "reason", err)}). Without a network here, '
                 f'download it elsewhere, {check}put it at {os.path.abspath(dest)} and run the same command again.')


def fetch_url(url, dest, expected=None):
    """Download url to dest once; check it against `expected` or the SHA-256 recorded at its first download."""
    record = dest + '.sha256'
    if expected is None and os.path.exists(record):
        with open(record) as f:
            expected = f.read().split()[0]
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        download_or_exit(url, dest, f'its SHA-256 is {expected}' if expected else None)
    sha256 = digest(dest, 'sha256')
    if expected and sha256 != expected:
        os.replace(dest, dest + '.bad')
        sys.exit(f'fetch: {dest} has SHA-256 {sha256}, not {expected} ({"given" if not os.path.exists(record) else "recorded in " + record}); kept as {dest}.bad')
    if not os.path.exists(record):
        with open(record + '.partial', 'w') as f:
            f.write(f'{sha256}  {os.path.basename(dest)}  {url}\n')
        os.replace(record + '.partial', record)
    print(f'{dest}: SHA-256 {sha256} ' + ('verified' if expected else f'recorded in {record} (no published checksum)'))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('dataset', choices=sorted(ARCHIVES))
    parser.add_argument('--dest', help='where the downloaded archive goes (cifar10)')
    parser.add_argument('--source', action='append', default=[], help='an archive you supply, checked in place (ffhq, imagenet64); repeatable')
    parser.add_argument('--sha256', action='append', default=[], help='expected SHA-256 of each --source, in order (your own record), or of --url')
    parser.add_argument('--url', help='the file to download (url)')
    args = parser.parse_args()
    archive = ARCHIVES[args.dataset]
    try:
        if args.dataset == 'url':
            if not (args.url and args.dest):
                parser.error('url needs --url and --dest')
            return fetch_url(args.url, args.dest, args.sha256[0].lower() if args.sha256 else None)
        if 'url' in archive or 'files' in archive:
            if not args.dest:
                parser.error(f'{args.dataset} needs --dest')
            downloads = [(archive['url'], archive['md5'], args.dest)] if 'url' in archive else \
                [(url, md5, os.path.join(args.dest, url.rsplit('/', 1)[1])) for url, md5 in archive['files']]
            for url, md5, dest in downloads:
                os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
                if not (os.path.exists(dest) and digest(dest, 'md5') == md5):
                    download_or_exit(url, dest, f'its MD5 is {md5}')
                    if digest(dest, 'md5') != md5:
                        os.replace(dest, dest + '.bad')
                        sys.exit(f'fetch: {url} did not match MD5 {md5}; kept as {dest}.bad')
                print(f'{dest}: MD5 {md5} verified')
            return
        sources = [source for source in args.source if source]
        if not sources:
            sys.exit(f'fetch: {args.dataset} needs a login to download; get it from {archive["where"]} and pass its path')
        if args.sha256 and len(args.sha256) != len(sources):
            sys.exit(f'fetch: {len(sources)} archives but {len(args.sha256)} checksums')
        for index, source in enumerate(sources):
            if not os.path.isfile(source):
                sys.exit(f'fetch: {source} is not a file')
            sha256 = digest(source, 'sha256')
            expected = args.sha256[index].lower() if args.sha256 else None
            if expected and sha256 != expected:
                sys.exit(f'fetch: {source} has SHA-256 {sha256}, not the expected {expected}')
            print(f'{source}: SHA-256 {sha256} {"verified" if expected else "(no expected value given: keep it as your record)"}')
    except OSError as err:
        sys.exit(f'fetch: {err}')


if __name__ == '__main__':
    with interruptible('tools.data.fetch'): # Ctrl-C: one line, no traceback
        main()
