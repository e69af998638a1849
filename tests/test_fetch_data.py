"""tools/data/fetch.py: checksum verification of downloads and of archives the user supplies."""

import hashlib
import http.server
import os
import sys
import threading

import pytest

from conftest import tool
from tools.data import fetch as fetch_data


@pytest.fixture
def server(tmp_path):
    """A local HTTP server for tmp_path/served: the download path without the internet."""
    served = tmp_path / 'served'
    served.mkdir()
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()


def fetch(monkeypatch, *argv):
    monkeypatch.setattr(sys, 'argv', ['fetch.py', *argv])
    fetch_data.main()


def test_download_is_verified_and_kept(server, tmp_path, monkeypatch, capsys):
    served, url = server
    payload = os.urandom(3 << 20)
    (served / 'archive.tar.gz').write_bytes(payload)
    monkeypatch.setitem(fetch_data.ARCHIVES, 'cifar10', dict(url=f'{url}/archive.tar.gz', md5=hashlib.md5(payload).hexdigest()))
    dest = tmp_path / 'downloads' / 'archive.tar.gz'
    fetch(monkeypatch, 'cifar10', f'--dest={dest}')
    assert dest.read_bytes() == payload and 'verified' in capsys.readouterr().out
    (served / 'archive.tar.gz').unlink() # a verified file is not downloaded again
    fetch(monkeypatch, 'cifar10', f'--dest={dest}')


def test_wrong_checksum_is_an_error_and_the_file_is_set_aside(server, tmp_path, monkeypatch):
    served, url = server
    (served / 'archive.tar.gz').write_bytes(b'not the archive')
    monkeypatch.setitem(fetch_data.ARCHIVES, 'cifar10', dict(url=f'{url}/archive.tar.gz', md5='0' * 32))
    dest = tmp_path / 'archive.tar.gz'
    with pytest.raises(SystemExit, match='did not match MD5'):
        fetch(monkeypatch, 'cifar10', f'--dest={dest}')
    assert not dest.exists() and (tmp_path / 'archive.tar.gz.bad').exists()


def test_supplied_archive_is_checked_in_place(tmp_path):
    archive = tmp_path / 'ffhq.zip'
    archive.write_bytes(b'images')
    good = hashlib.sha256(b'images').hexdigest()
    run = lambda *args: tool('data.fetch', 'ffhq', *args)
    assert run(f'--source={archive}', f'--sha256={good}').returncode == 0
    wrong = run(f'--source={archive}', f'--sha256={"1" * 64}')
    assert wrong.returncode == 1 and 'not the expected' in wrong.stderr
    missing = run()
    assert missing.returncode == 1 and 'github.com/NVlabs/ffhq-dataset' in missing.stderr and 'Traceback' not in missing.stderr
    imagenet = tool('data.fetch', 'imagenet64')
    assert imagenet.returncode == 1 and 'image-net.org' in imagenet.stderr


def test_multi_file_download_checks_each_file(server, tmp_path, monkeypatch):
    served, url = server
    files = {'train-images-idx3-ubyte.gz': b'images', 'train-labels-idx1-ubyte.gz': b'labels'}
    for name, payload in files.items():
        (served / name).write_bytes(payload)
    monkeypatch.setitem(fetch_data.ARCHIVES, 'mnist', dict(files=[(f'{url}/{name}', hashlib.md5(payload).hexdigest()) for name, payload in files.items()]))
    fetch(monkeypatch, 'mnist', f'--dest={tmp_path / "mnist"}')
    assert all((tmp_path / 'mnist' / name).read_bytes() == payload for name, payload in files.items())
    (served / 'train-labels-idx1-ubyte.gz').write_bytes(b'tampered')
    (tmp_path / 'mnist' / 'train-labels-idx1-ubyte.gz').unlink()
    with pytest.raises(SystemExit, match='did not match MD5'):
        fetch(monkeypatch, 'mnist', f'--dest={tmp_path / "mnist"}')


def test_a_failed_download_names_the_url_and_where_a_copy_goes(server, tmp_path, monkeypatch):
    _, url = server
    dest = tmp_path / 'downloads' / 'archive.tar.gz'
    for missing in [f'{url}/no-such-archive.tar.gz', 'http://127.0.0.1:9/archive.tar.gz']: # HTTP 404; nothing listening (no network)
        monkeypatch.setitem(fetch_data.ARCHIVES, 'cifar10', dict(url=missing, md5='c58f30108f718f92721af3b95e74349a'))
        with pytest.raises(SystemExit) as failed:
            fetch(monkeypatch, 'cifar10', f'--dest={dest}')
        message = str(failed.value.code)
        assert message.startswith(f'fetch: downloading {missing} failed') and '\n' not in message
        assert f'its MD5 is c58f30108f718f92721af3b95e74349a, put it at {dest}' in message


def test_a_file_without_a_published_checksum_is_held_to_the_one_recorded_at_its_first_download(server, tmp_path, monkeypatch, capsys):
    served, url = server
    payload = os.urandom(1 << 16)
    (served / 'network.pkl').write_bytes(payload)
    dest = tmp_path / 'edm-pretrained' / 'network.pkl'
    fetch(monkeypatch, 'url', f'--url={url}/network.pkl', f'--dest={dest}')
    digest = hashlib.sha256(payload).hexdigest()
    assert dest.read_bytes() == payload and (tmp_path / 'edm-pretrained' / 'network.pkl.sha256').read_text().startswith(digest)
    assert 'recorded in' in capsys.readouterr().out
    fetch(monkeypatch, 'url', f'--url={url}/network.pkl', f'--dest={dest}')
    assert 'verified' in capsys.readouterr().out
    changed = payload[:-1] + bytes([payload[-1] ^ 0xFF]) # every bit of the last byte flipped: never the payload itself
    assert changed != payload
    dest.write_bytes(changed) # changed since: refused and set aside
    with pytest.raises(SystemExit, match=f'not {digest}'):
        fetch(monkeypatch, 'url', f'--url={url}/network.pkl', f'--dest={dest}')
    assert not dest.exists() and (tmp_path / 'edm-pretrained' / 'network.pkl.bad').exists()
    other = tmp_path / 'other.pkl' # a checksum given on the command line wins
    with pytest.raises(SystemExit, match='not ' + '2' * 64):
        fetch(monkeypatch, 'url', f'--url={url}/network.pkl', f'--dest={other}', f'--sha256={"2" * 64}')
