"""IMDBDataModule: both layouts, safe archives, clear errors, tokenization, padding, splits, download."""

import hashlib

import pytest
import torch

from lightning_robust.datamodules import IMDBDataModule, PadCollate, read_imdb, safe_extract
from lightning_robust.datamodules.imdb import download_imdb
from lightning_robust.datamodules.integrity import DataIntegrityError, write_checksum_manifest
from lightning_robust.utils.text import WordVocabulary, basic_tokenize
from tests.helpers.imdb import make_imdb_folder, make_imdb_tar


@pytest.fixture
def imdb_dir(tmp_path):
    return make_imdb_folder(tmp_path / "imdb", n_train=8, n_test=4)


def test_folder_and_archive_read_identically(imdb_dir, tmp_path):
    from_folder = read_imdb(imdb_dir)
    archive = make_imdb_tar(imdb_dir, tmp_path / "aclImdb_v1.tar.gz")
    from_tar = read_imdb(archive, verify=False)
    for split, n in (("train", 16), ("test", 8)):
        a, b = from_folder[split], from_tar[split]
        assert len(a) == len(b) == n
        assert a.texts == b.texts and a.labels == b.labels and a.ratings == b.ratings
        assert sorted(a.labels) == a.labels and a.labels.count(1) == n // 2
        # Ratings follow the official convention: <= 4 negative, >= 7 positive.
        assert all((r >= 7) == bool(y) for r, y in zip(a.ratings, a.labels))
    # The folder holding only the archive reads the same too.
    only_tar = tmp_path / "only_tar"
    only_tar.mkdir()
    (only_tar / "aclImdb_v1.tar.gz").write_bytes(archive.read_bytes())
    assert read_imdb(only_tar, verify=False)["train"].texts == from_folder["train"].texts


def test_archive_member_escaping_the_folder_is_refused(imdb_dir, tmp_path):
    bad = make_imdb_tar(imdb_dir, tmp_path / "evil.tar.gz", extra={"aclImdb/../../evil.txt": b"pwned"})
    with pytest.raises(ValueError, match=r"member 'aclImdb/\.\./\.\./evil\.txt' has a path that escapes"):
        read_imdb(bad, verify=False)
    dest = tmp_path / "out" / "inner"
    with pytest.raises(ValueError, match="escapes"):
        safe_extract(bad, dest)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert not any(dest.rglob("*.txt"))  # nothing extracted at all
    absolute = make_imdb_tar(imdb_dir, tmp_path / "abs.tar.gz", extra={"/tmp/evil_abs.txt": b"x"})
    with pytest.raises(ValueError, match="escapes"):
        safe_extract(absolute, tmp_path / "out2")
    link = make_imdb_tar(imdb_dir, tmp_path / "link.tar.gz", symlink=("aclImdb/train/pos/99_9.txt", "/etc/passwd"))
    with pytest.raises(ValueError, match="is a link"):
        read_imdb(link, verify=False)
    with pytest.raises(ValueError, match="is a link"):
        safe_extract(link, tmp_path / "out3")


def test_safe_extract_then_read(imdb_dir, tmp_path):
    archive = make_imdb_tar(imdb_dir, tmp_path / "a.tar.gz")
    out = safe_extract(archive, tmp_path / "x")
    assert read_imdb(out)["test"].texts == read_imdb(imdb_dir)["test"].texts
    # extract=True in the DataModule does the same from data_dir/aclImdb_v1.tar.gz.
    d = tmp_path / "dm"
    d.mkdir()
    (d / "aclImdb_v1.tar.gz").write_bytes(archive.read_bytes())
    dm = IMDBDataModule(str(d), extract=True, tokenizer="word", verify=False)
    dm.prepare_data()
    assert (d / "aclImdb" / "train" / "pos").is_dir()


@pytest.mark.parametrize(("content", "match"), [(b"   \n", "is empty"), (b"caf\xe9 au lait", "is not valid UTF-8")])
def test_bad_review_files_are_named(imdb_dir, tmp_path, content, match):
    bad = imdb_dir / "aclImdb" / "train" / "neg" / "77_1.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"77_1.txt {match}"):
        read_imdb(imdb_dir)
    archive = make_imdb_tar(imdb_dir, tmp_path / "bad.tar.gz")
    with pytest.raises(ValueError, match=f"aclImdb/train/neg/77_1.txt in .*bad.tar.gz {match}"):
        read_imdb(archive, verify=False)


def test_missing_data_names_the_layout_and_url(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"aclImdb/\{train,test\}.*ai.stanford.edu"):
        read_imdb(tmp_path)


def test_download_checks_the_md5(imdb_dir, tmp_path):
    archive = make_imdb_tar(imdb_dir, tmp_path / "served.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=r"has MD5 .* expected 0+; the file was deleted"):
        download_imdb(tmp_path / "bad", url=archive.as_uri(), md5="0" * 32)
    assert not any((tmp_path / "bad").iterdir())
    got = download_imdb(tmp_path / "good", url=archive.as_uri(), md5=md5)
    assert got.name == "aclImdb_v1.tar.gz" and got.read_bytes() == archive.read_bytes()


def test_batches_pad_dynamically_with_index_and_truncate(imdb_dir):
    dm = IMDBDataModule(str(imdb_dir), tokenizer="word", vocab_size=50, max_length=10, batch_size=4,
                        val_fraction=0.25, with_index=True)
    dm.setup()
    assert isinstance(dm.text_tokenizer, WordVocabulary) and len(dm.text_tokenizer) <= 50
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 4 and len(dm.test_dataset) == 8
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) <= 10
    assert ((batch["input_ids"] == 0) == (batch["attention_mask"] == 0)).all()  # pad id 0 exactly off-mask
    for row, n, i in zip(batch["input_ids"], lengths, batch["index"]):
        ids, _ = dm.train_dataset[int(i)]
        assert torch.equal(row[:n], ids)
    # Collate of unequal lengths, checked by hand.
    out = PadCollate(pad_id=7)([(torch.tensor([1, 2, 3]), 1), (torch.tensor([4]), 0)])
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_validation_split_is_deterministic_and_seeded(imdb_dir):
    def val_texts(seed):
        dm = IMDBDataModule(str(imdb_dir), tokenizer="word", val_fraction=0.25, seed=seed)
        dm.setup()
        return [dm.val_dataset.dataset.texts[i] for i in dm.val_dataset.indices]

    assert val_texts(0) == val_texts(0)
    assert val_texts(0) != val_texts(1)


def test_limits_draw_balanced_subsets(imdb_dir):
    dm = IMDBDataModule(str(imdb_dir), tokenizer="word", limit_train=6, limit_test=4, val_fraction=0.0)
    dm.setup()
    assert sorted(dm.train_dataset.dataset.labels) == [0, 0, 0, 1, 1, 1]
    assert sorted(dm.test_dataset.labels) == [0, 0, 1, 1]


def test_word_vocabulary_roundtrip(tmp_path):
    vocab = WordVocabulary.build(["A good film, a GOOD plot.", "A bad film!"], max_size=6)
    assert vocab.words == ["<pad>", "<unk>", "a", "film", "good", "!"]  # ties broken alphabetically
    assert vocab.encode("a bad film") == [2, 1, 3]
    assert WordVocabulary.load(vocab.save(tmp_path / "v.txt")).words == vocab.words
    assert basic_tokenize("I didn't like it.<br />It's <unk> 10/10") == [
        "i", "did", "n't", "like", "it", ".", "it", "'s", "<unk>", "10", "/", "10"]
    with pytest.raises(ValueError, match="must start with"):
        WordVocabulary(["a", "b"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"vocab_size": 2}, "vocab_size must be an integer >= 3"), ({"max_length": 1}, "max_length must be"),
     ({"limit_train": 0}, "limit_train must be"), ({"tokenizer": ""}, "tokenizer must be"),
     ({"batch_size": 0}, "batch_size must be a positive integer")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IMDBDataModule(**kwargs)


@pytest.mark.text
def test_minilm_tokenizer_and_glove_vocabulary(imdb_dir):
    dm = IMDBDataModule(str(imdb_dir), tokenizer="auto", max_length=8, val_fraction=0.0)
    dm.setup()
    ids, _ = dm.train_dataset[0]
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) <= 8  # [CLS] ... [SEP] (BERT uncased)
    assert set(dm.special_token_ids) == {0, 100, 101, 102, 103}
    dm2 = IMDBDataModule(str(imdb_dir), tokenizer="glove", vocab_size=1000)
    vocab = dm2.text_tokenizer
    from lightning_robust.utils.text import load_glove

    words, _ = load_glove(max_words=998, vectors=False)
    assert vocab.words[2:] == words and vocab.words[2:6] == ["the", ",", ".", "of"]


@pytest.mark.data
def test_real_imdb_archive_counts(shared_data, tmp_path):
    vocab = WordVocabulary.build(["the movie was good and the plot was bad"]).save(tmp_path / "vocab.txt")
    # The shared copy is a re-packed archive (its MD5 is not the official one); its gzip CRC is still checked.
    dm = IMDBDataModule(str(shared_data / "IMDB"), tokenizer=str(vocab), val_fraction=0.0, verify=False)
    full, test = dm.build_datasets()
    assert len(full) == 25_000 and len(test) == 25_000
    for ds in (full, test):
        assert ds.labels.count(0) == 12_500 and ds.labels.count(1) == 12_500
    ids, label = test[0]
    assert ids.dtype == torch.long and 0 < len(ids) <= 256 and label == 0



def test_local_archive_is_checked_against_the_official_md5_by_default(imdb_dir, tmp_path, monkeypatch):
    # Issue 18: a local aclImdb_v1.tar.gz was read without any checksum. Now the official MD5 is the default;
    # verify=False and a manifest (for a re-packed copy) are the two ways out.
    d = tmp_path / "dm"
    archive = make_imdb_tar(imdb_dir, d / "aclImdb_v1.tar.gz") if d.mkdir() is None else None
    assert archive is not None
    with pytest.raises(DataIntegrityError, match=r"aclImdb_v1\.tar\.gz: checksum mismatch .*official.*verify=False"):
        read_imdb(d)
    with pytest.raises(DataIntegrityError, match="checksum mismatch"):
        IMDBDataModule(str(d), tokenizer="word").build_datasets()
    assert len(read_imdb(d, verify=False)["train"]) == 16
    manifest = write_checksum_manifest(d, ["aclImdb_v1.tar.gz"], name="MY_MD5SUMS")
    assert len(read_imdb(d, checksums=manifest)["train"]) == 16
    monkeypatch.setattr("lightning_robust.datamodules.imdb.IMDB_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    assert len(read_imdb(d)["test"]) == 8  # the "official" archive passes


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1:]


def test_flipped_bits_in_the_compressed_archive_are_errors_naming_it(imdb_dir, tmp_path):
    # Issue 18: the streaming tar reader stops at the tar end marker and never checks the gzip CRC, so one
    # flipped bit changed reviews silently. Every flip in the deflate data or the trailer is now an error
    # naming the file (the gzip header, a time stamp and the original file name, is not covered by the CRC;
    # the MD5 covers it).
    archive = make_imdb_tar(imdb_dir, tmp_path / "aclImdb_v1.tar.gz")
    data = archive.read_bytes()
    assert data[3] == 0x08  # FNAME only: the header ends after the zero-terminated name
    start = data.index(b"\0", 10) + 1
    clean = read_imdb(archive, verify=False)
    bad = tmp_path / "flipped" / "aclImdb_v1.tar.gz"
    bad.parent.mkdir()
    positions = [*range(start, len(data), max(1, (len(data) - start) // 40)), len(data) - 8, len(data) - 1]
    for pos in positions:
        bad.write_bytes(_flip(data, pos))
        with pytest.raises((DataIntegrityError, ValueError), match=r"flipped/aclImdb_v1\.tar\.gz"):
            read_imdb(bad, verify=False)
    bad.write_bytes(data)
    assert read_imdb(bad, verify=False)["train"].texts == clean["train"].texts


def test_truncated_archive_is_an_error_naming_it(imdb_dir, tmp_path):
    archive = make_imdb_tar(imdb_dir, tmp_path / "aclImdb_v1.tar.gz")
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    for size in (len(data) // 2, len(data) - 20, len(data) - 8, len(data) - 1):
        cut.write_bytes(data[:size])
        with pytest.raises(DataIntegrityError, match=r"cut\.tar\.gz: the archive is truncated or corrupted"):
            read_imdb(cut, verify=False)
        with pytest.raises(DataIntegrityError, match=r"cut\.tar\.gz: the archive is truncated or corrupted"):
            safe_extract(cut, tmp_path / "out")
        assert not (tmp_path / "out").exists()
