"""Score records: one JSON file a scored snapshot, runs/<row>/scores/<snapshot>.nfe<NFE>.<images>.json,
written by tools.scoring.score and read by tools.scoring.results; and the rule that picks the
snapshot a row reports.

A record holds every finished FID evaluation of one snapshot (seeds, FID, seconds), their minimum,
mean and spread (max - min), the detector that made them and the training images behind the snapshot.
"""

import glob
import json
import os
import re

import numpy as np

# The detectors a record can name: fid.py's own, the stand-in of smoke runs (tools/scoring/fid_standin.py),
# or the digit classifier of the mini tables (tools/scoring/digit_detector.py; a record of it also carries
# digit_detector.detector_identity(): its weights' SHA-256).
DETECTORS = {'inception': "Inception-v3 (EDM's fid.py)", 'standin': 'stand-in random projection (smoke: plumbing only)',
             'digits': 'digit classifier features (mini: MNIST digits)'}


def number_in_name(path):
    """The last number in a file name: network-snapshot-000200.pkl -> 200, model500000.pt -> 500000."""
    return int(re.findall(r'(\d+)\D*$', os.path.basename(path))[0])


def newest(pattern):
    """The file matching pattern with the largest number in its name, or None."""
    paths = glob.glob(pattern)
    return max(paths, key=number_in_name) if paths else None


def record_name(snapshot, nfe, images):
    """The stem of a snapshot's record (and of its preview and image folders) for one protocol."""
    return f'{os.path.basename(snapshot).rsplit(".", 1)[0]}.nfe{nfe}.{images}'


def write_json(path, data):
    """Write atomically: a kill leaves the old record or the new one, never half of one."""
    with open(path + '.partial', 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(path + '.partial', path)


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def summarise(record):
    """The record's minimum, mean and spread over its finished evaluations."""
    fids = [e['fid'] for e in record['evaluations']]
    record.update(fid_min=min(fids), fid_mean=float(np.mean(fids)), fid_spread=max(fids) - min(fids), fid_count=len(fids))
    return record


def best(records):
    """The snapshot a row reports: the lowest FID (each snapshot's minimum over its evaluations); of
    equal ones, the later."""
    return min(records, key=lambda record: (record['fid_min'], -record['images_seen']))


def load_records(folder):
    """The run's snapshot records, by training images; each with 'complete' (every planned evaluation done)."""
    records = []
    for path in glob.glob(os.path.join(folder, 'scores', '*.json')):
        record = read_json(path)
        if record.get('evaluations'):
            record['complete'] = record['fid_count'] >= record.get('evaluations_planned', 1)
            records.append(record)
    return sorted(records, key=lambda record: (record['images_seen'], record['nfe']))


def reported(records):
    """(best, last) snapshot records: among complete ones if any, else among those started."""
    pool = [record for record in records if record['complete']] or records
    return (best(pool), pool[-1]) if pool else (None, None)


def by_protocol(records):
    """The records grouped by NFE and images an evaluation (FID_IMAGES=70000 on FFHQ scores a run twice):
    the snapshots of one group are compared, groups are not."""
    groups = {}
    for record in records:
        groups.setdefault((record['nfe'], record['images']), []).append(record)
    return list(groups.values())
