"""The standard-library text corpus and byte windows."""

import hashlib

import pytest
import torch

from dataorder.corpus import Document, byte_windows, load_stdlib_corpus
from dataorder.models import ByteLM


def _fake_stdlib(root):
    (root / "test").mkdir()
    (root / "site-packages").mkdir()
    (root / "__pycache__").mkdir()
    (root / "json").mkdir()
    (root / "os.py").write_text('"""Module doc."""\n\ndef f():\n    """Fn doc."""\n    return 1\n')
    (root / "json" / "decoder.py").write_text("class D:\n    '''Class doc.'''\n")
    (root / "test" / "test_os.py").write_text("assert True\n")
    (root / "site-packages" / "third.py").write_text("x = 1\n")
    (root / "__pycache__" / "junk.py").write_text("y = 2\n")
    (root / "latin.py").write_bytes(b"# \xe9\n")  # not UTF-8: skipped
    return root


def test_selection_domains_and_docstrings(tmp_path):
    corpus = load_stdlib_corpus(root=_fake_stdlib(tmp_path), validation_fraction=0.0)
    assert [(d.domain, d.path) for d in corpus.documents] == [
        ("code", "json/decoder.py"), ("code", "os.py"), ("tests", "test/test_os.py"),
        ("prose", "json/decoder.py"), ("prose", "os.py")]
    assert corpus.select(domain="prose", split="train")[1].text == "Module doc.\n\nFn doc."
    assert corpus.domains == ("code", "tests", "prose")


def test_split_depends_on_path_hash_only(tmp_path):
    corpus = load_stdlib_corpus(root=_fake_stdlib(tmp_path), validation_fraction=0.5)
    for doc in corpus.documents:
        fraction = int.from_bytes(hashlib.sha256(doc.path.encode()).digest()[:8], "big") / 2**64
        assert doc.split == ("validation" if fraction < 0.5 else "train")


def test_fingerprint_changes_with_content(tmp_path):
    root = _fake_stdlib(tmp_path)
    first = load_stdlib_corpus(root=root).fingerprint
    assert load_stdlib_corpus(root=root).fingerprint == first
    (root / "os.py").write_text("z = 3\n")
    assert load_stdlib_corpus(root=root).fingerprint != first


def test_real_stdlib_is_deterministic_and_capped():
    a = load_stdlib_corpus(max_bytes=50_000, domains=("code", "tests"))
    b = load_stdlib_corpus(max_bytes=50_000, domains=("code", "tests"))
    assert a.fingerprint == b.fingerprint and len(a.documents) > 1
    for domain in a.domains:
        assert sum(len(d.text.encode()) for d in a.select(domain=domain)) <= 50_000


@pytest.mark.parametrize("bad", [dict(validation_fraction=1.0), dict(max_bytes=0), dict(domains=("poetry",)),
                                 dict(root="/nonexistent/dir")])
def test_bad_arguments(bad):
    with pytest.raises((ValueError, FileNotFoundError)):
        load_stdlib_corpus(**bad)


def test_byte_windows_are_exact_and_labelled():
    docs = [Document("a", "code", "train", "abcdefg"), Document("b", "prose", "train", "xy"),
            Document("c", "prose", "train", "é12")]
    windows = byte_windows(docs, context=2, domains=("code", "prose"))
    assert windows.tokens.tolist() == [[97, 98, 99], [99, 100, 101], [101, 102, 103], [0xC3, 0xA9, 49]]
    assert windows.domain.tolist() == [0, 0, 0, 1] and windows.document.tolist() == [0, 0, 0, 2]
    x, y = windows.inputs_targets()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(byte_windows(docs, 2, max_windows_per_document=1)) == 2
    with pytest.raises(ValueError, match="context"):
        byte_windows(docs, context=100)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_window_cap_names_itself(bad):
    docs = [Document("a", "code", "train", "abcdefg")]
    with pytest.raises(ValueError, match=r"^max_windows_per_document must be a positive int or None"):
        byte_windows(docs, 2, max_windows_per_document=bad)


def test_byte_lm_is_causal():
    torch.manual_seed(0)
    model = ByteLM(context=8, dim=16, layers=1, heads=2)
    tokens = torch.randint(0, 256, (2, 8))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 256
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_a_capped_corpus_keeps_both_splits():
    # regression: the cap used to take files in the order of the split's own hash, so a capped
    # corpus held only validation files (the smallest hashes) and no training file
    corpus = load_stdlib_corpus(max_bytes=400_000, domains=("code",), validation_fraction=0.1)
    splits = [doc.split for doc in corpus.documents]
    assert splits.count("train") > 4 * splits.count("validation") > 0


def test_loader_arguments_that_cannot_select_anything_are_refused_in_one_line():
    with pytest.raises(TypeError, match=r"domains=\('code',\)"):
        load_stdlib_corpus(domains="code")
    with pytest.raises(TypeError, match="domains must be a sequence"):
        load_stdlib_corpus(domains=None)
    with pytest.raises(ValueError, match="no 'code' document fits max_bytes=1.*raise max_bytes"):
        load_stdlib_corpus(max_bytes=1, domains=("code",))
