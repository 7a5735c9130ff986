import json
import pickle
import random

import numpy as np
import pytest
import torch

from memloc.data import from_arrays, inject_label_noise, load_cifar10, load_dataset, load_digits, load_mnist1d


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.1, 0.25, 0.333])
def test_noise_flips_exact_count_never_to_original(digits, fraction):
    noisy = inject_label_noise(digits, fraction, seed=1)
    train = noisy.split == "train"
    n_train = int(train.sum())
    flipped = (noisy.y != noisy.original_label).numpy()
    assert flipped.sum() == round(fraction * n_train)
    assert np.array_equal(flipped, noisy.group == "noisy")
    assert not flipped[~train].any(), "test examples must never be flipped"
    assert np.all(noisy.group[~train] == "test")
    assert torch.equal(noisy.original_label, digits.y)
    assert torch.equal(noisy.x, digits.x) and torch.equal(noisy.example_id, digits.example_id)
    assert noisy.meta["noise"] == {"fraction": fraction, "seed": 1, "count": round(fraction * n_train)}


def test_noise_reproducible_per_seed_and_input_untouched(digits):
    y_before = digits.y.clone()
    a, b, c = (inject_label_noise(digits, 0.2, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.y, b.y) and np.array_equal(a.group, b.group)
    assert not torch.equal(a.y, c.y)
    assert torch.equal(digits.y, y_before) and not (digits.group == "noisy").any()


def test_noise_uses_all_wrong_classes_uniformly():
    # 10 classes, 20000 training examples all of class 3: every wrong class, including y-1 = 2 (never drawn by
    # the reference code), must appear about equally often
    data = from_arrays(np.zeros((20000, 2)), np.full(20000, 3), num_classes=10)
    noisy = inject_label_noise(data, 0.9, seed=0)
    new = noisy.y[torch.as_tensor(noisy.group == "noisy")].numpy()
    counts = np.bincount(new, minlength=10)
    assert counts[3] == 0
    expected = len(new) / 9
    others = np.delete(counts, 3)
    assert np.all(np.abs(others - expected) < 5 * np.sqrt(expected)), counts


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_noise_fraction_out_of_range(digits, bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        inject_label_noise(digits, bad)


def test_noise_twice_is_refused(digits):
    with pytest.raises(ValueError, match="already has label noise"):
        inject_label_noise(inject_label_noise(digits, 0.1), 0.1)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnist2d'.*cifar10.*digits.*mnist1d"):
        load_dataset("mnist2d")


def test_mnist1d_generated_offline_stable_and_leaves_global_rng_alone():
    random.seed(123)
    np.random.seed(123)
    expect_py, expect_np = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    a = load_mnist1d(num_samples=600, seed=5)
    assert (random.random(), np.random.rand()) == (expect_py, expect_np)
    b = load_mnist1d(num_samples=600, seed=5)
    c = load_mnist1d(num_samples=600, seed=6)
    assert a.x.shape == (600, 40) and a.num_classes == 10
    assert (a.split == "train").sum() == 480
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert torch.equal(a.example_id, torch.arange(600))
    assert not torch.equal(a.x, c.x)
    a.x.zero_()  # mutating one copy must not corrupt the cache
    assert not torch.equal(load_mnist1d(num_samples=600, seed=5).x, a.x)
    with pytest.raises(ValueError, match="Unknown MNIST-1D argument"):
        load_mnist1d(num_sample=600)


def test_digits_split_and_ids(digits):
    assert len(digits) == 1797 and digits.x.shape[1:] == (64,)
    assert 0 <= float(digits.x.min()) and float(digits.x.max()) <= 1
    assert set(np.unique(digits.split)) == {"train", "test"}
    img = load_digits(images=True)
    assert img.x.shape[1:] == (1, 8, 8)
    assert torch.equal(img.x.reshape(len(img), -1), digits.x) and torch.equal(img.y, digits.y)


def test_by_ids_and_examples_table(digits):
    noisy = inject_label_noise(digits, 0.1, seed=0)
    ids = noisy.example_id[torch.as_tensor(noisy.group == "noisy")][:5].flip(0)
    sub = noisy.by_ids(ids)
    assert torch.equal(sub.example_id, ids) and (sub.group == "noisy").all()
    table = noisy.examples()
    assert list(table.columns) == ["example_id", "split", "label", "original_label", "group"]
    assert (table.label != table.original_label).sum() == (table.group == "noisy").sum()
    with pytest.raises(KeyError, match="Unknown example id"):
        noisy.by_ids([10**6])


def _fake_cifar(root, n_per_batch=6, n_test=5):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}, fh)
        batches[name] = (data, labels)
    return folder, batches


def test_cifar_reads_python_batches(tmp_path):
    folder, batches = _fake_cifar(tmp_path)
    for root in (tmp_path, folder):  # parent or the batches folder itself
        d = load_cifar10(root)
        assert d.x.shape == (35, 3, 32, 32) and (d.split == "train").sum() == 30
        first = batches["data_batch_1"][0][0].reshape(3, 32, 32).astype(np.float32) / 255
        assert np.allclose(d.x[0].numpy(), (first - 0.5) / 0.5)
        assert d.y[6:12].tolist() == batches["data_batch_2"][1]
        assert d.y[30:].tolist() == batches["test_batch"][1]
    small = load_cifar10(tmp_path, n_train=4, n_test=2, normalize=False)
    assert len(small) == 6 and float(small.x.min()) >= 0


def test_cifar_missing_folder_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*never downloads"):
        load_cifar10(tmp_path / "nowhere")


def test_cifar_refuses_arbitrary_pickles(tmp_path):
    folder, _ = _fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    from memloc.validate import InputFileError

    with pytest.raises(InputFileError, match="data_batch_3 is not a CIFAR-10 python batch.*Refusing to load "
                                             "builtins.print"):
        load_cifar10(tmp_path)


def test_from_arrays_validates():
    with pytest.raises(ValueError, match="x has 3 examples but y has 2"):
        from_arrays(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="out of range for num_classes=2"):
        from_arrays(np.zeros((3, 2)), [0, 1, 2], num_classes=2)
    d = from_arrays(np.zeros((3, 2)), [0, 1, 1], np.ones((2, 2)), [1, 0])
    assert d.example_id.tolist() == [0, 1, 2, 3, 4] and d.group.tolist() == ["clean"] * 3 + ["test"] * 2


def test_text_loaders_and_secret_records(tmp_path):
    from memloc.data.records import CandidateSpace, Secret, load_texts

    texts = ["alpha beta", "gamma delta", "epsilon"]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    assert load_texts(texts) == load_texts(tmp_path / "t.txt") == load_texts(tmp_path / "t.jsonl") == texts
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts(tmp_path / "ds") == texts
    with pytest.raises(ValueError, match="no column 'body'"):
        load_texts(tmp_path / "ds", field="body")
    with pytest.raises(ValueError, match="has no field 'body'"):
        load_texts(tmp_path / "t.jsonl", field="body")
    with pytest.raises(FileNotFoundError, match="No texts at"):
        load_texts(tmp_path / "missing.txt")
    space = CandidateSpace(3)
    assert space.size == 1000 and space.index("042") == 42 and list(space.all())[42] == "042"
    spaced = CandidateSpace(2, tuple("ab"), " ")
    assert list(spaced.all()) == ["a a", "a b", "b a", "b b"] and spaced.index("b a") == 2
    assert Secret("x", "code is", "417", space).text == "code is 417"
    with pytest.raises(ValueError, match="not a string of 3 symbols"):
        Secret("x", "code is", "41", space)
