"""PatchCore (coreset, nearest neighbours, planted defects, checkpoints, ONNX) and the blur floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FakeResNet, texture, texture_png, write_png
from scipy import ndimage

from ssimae.blur import BlurResidual, gaussian_taps
from ssimae.checkpoint import Checkpoint
from ssimae.config import Config
from ssimae.detector import load_detector
from ssimae.errors import SettingError
from ssimae.patchcore import (block_scales, build_patchcore, default_blocks, default_image_size, greedy_coreset,
                              image_defaults, nearest_block_distances, nearest_distances)
from ssimae.train import fit

SETTINGS = dict(method="patchcore", image_size="128x128", memory_bank_size=300, device="cpu", val_fraction=0.2)


def _brute_force_k_centre(points: torch.Tensor, size: int, start: int) -> list[int]:
    """k-centre greedy from the full distance matrix: the definition, for small sets."""
    distances = torch.cdist(points.double(), points.double())
    chosen, nearest = [start], distances[start].clone()
    while len(chosen) < size:
        index = int(torch.argmax(nearest))
        chosen.append(index)
        nearest = torch.minimum(nearest, distances[index])
    return chosen


@pytest.mark.parametrize("seed", range(4))
def test_greedy_coreset_without_projection_is_the_k_centre_greedy_selection(seed):
    points = torch.randn(300, 12, generator=torch.Generator().manual_seed(seed))
    chosen = greedy_coreset(points, 25, projection=0, seed=seed)
    assert chosen.tolist() == _brute_force_k_centre(points, 25, int(chosen[0]))
    assert len(set(chosen.tolist())) == 25


@pytest.mark.parametrize("seed", range(3))
def test_greedy_coreset_of_points_far_from_the_origin_is_still_the_k_centre_selection(seed):
    # Features of one sign (ReLU6 outputs) sit far from the origin, where |z|^2 - 2 z.c + |c|^2 in float32 loses
    # the digits that tell the farthest point from the next: the coreset works on points moved onto their mean.
    points = torch.randn(300, 12, generator=torch.Generator().manual_seed(seed)) + 500.0
    chosen = greedy_coreset(points, 40, projection=0, seed=seed)
    assert chosen.tolist() == _brute_force_k_centre(points, 40, int(chosen[0]))


def test_projected_coreset_covers_almost_as_well_as_the_exact_one():
    generator = torch.Generator().manual_seed(7)
    centres = 10 * torch.randn(40, 256, generator=generator)  # 40 clusters of 50 points, far apart
    points = centres.repeat_interleave(50, dim=0) + torch.randn(2000, 256, generator=generator)
    exact = greedy_coreset(points, 60, projection=0)
    projected = greedy_coreset(points, 60, projection=128)
    radius = lambda chosen: float(nearest_distances(points, points[chosen]).max())  # what k-centre minimises
    random = torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:60]
    assert radius(projected) < 1.1 * radius(exact)
    assert radius(projected) < 0.5 * radius(random)  # random picks miss whole clusters


def test_nearest_distances_are_exact_across_chunks(monkeypatch):
    import ssimae.patchcore as patchcore

    queries, bank = torch.randn(50, 8), torch.randn(70, 8)
    expected = torch.cdist(queries, bank).min(dim=1).values
    for name, size in (("QUERY_CHUNK", 16), ("BANK_CHUNK", 9), ("CPU_QUERY_CHUNK", 16), ("CPU_BANK_CHUNK", 9),
                       ("KDTREE_MAX_DIM", 0)):  # the CPU's sizes and the others (GPU, ONNX export); no k-d tree
        monkeypatch.setattr(patchcore, name, size)
    torch.testing.assert_close(nearest_distances(queries, bank), expected, atol=1e-4, rtol=0)
    # features far from the origin, as those of one sign are: |q|^2 - 2 q.m + |m|^2 in float32 would lose
    # about 1e-2 to cancellation here; moved by the bank's mean first, they keep the 1e-4
    queries, bank = queries + 100.0, bank + 100.0
    exact = torch.cdist(queries.double(), bank.double()).min(dim=1).values.float()
    torch.testing.assert_close(nearest_distances(queries, bank), exact, atol=1e-4, rtol=0)


def test_nearest_block_distances_are_each_blocks_own_nearest_across_chunks(monkeypatch):
    import ssimae.patchcore as patchcore

    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 11, generator=generator) + 30.0, torch.randn(70, 11, generator=generator) + 30.0
    dims = (3, 8)
    for name, size in (("QUERY_CHUNK", 16), ("BANK_CHUNK", 9), ("CPU_QUERY_CHUNK", 16), ("CPU_BANK_CHUNK", 9)):
        monkeypatch.setattr(patchcore, name, size)
    expected = torch.stack([torch.cdist(queries[:, :3].double(), bank[:, :3].double()).min(1).values,
                            torch.cdist(queries[:, 3:].double(), bank[:, 3:].double()).min(1).values]).float()
    distances = nearest_block_distances(queries, bank, dims)
    assert distances.shape == (2, 50)
    torch.testing.assert_close(distances, expected, atol=1e-4, rtol=0)
    # each block's nearest row is its own: the sum of the blocks' squared distances is at most the joint one's
    assert bool(((distances**2).sum(0) <= nearest_distances(queries, bank) ** 2 + 1e-3).all())
    # groups: each query's search leaves out the bank rows of its own group
    query_groups, bank_groups = torch.arange(50) % 3, torch.arange(70) % 3
    grouped = nearest_block_distances(queries, bank, dims, groups=(query_groups, bank_groups))
    for i in range(0, 50, 7):
        others = bank[bank_groups != query_groups[i]]
        for b, part in enumerate((slice(0, 3), slice(3, 11))):
            exact = torch.cdist(queries[i : i + 1, part].double(), others[:, part].double()).min().float()
            torch.testing.assert_close(grouped[b, i], exact, atol=1e-4, rtol=0)
    alone = nearest_block_distances(queries[:2], bank[:5], dims, groups=(torch.zeros(2), torch.zeros(5)))
    assert bool(torch.isinf(alone).all())  # every bank row is of the query's own group


def test_block_scales_are_the_mean_distance_to_other_images_bank_rows_by_hand():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 5, generator=generator)
    features[:, 2:] *= 10.0  # the second block lies ten times as far apart
    owners = torch.arange(40) // 8  # five images of eight features
    chosen = torch.tensor([0, 3, 9, 12, 20, 33])
    scales = block_scales(features, chosen, (2, 3), owners, seed=0, sample=40)  # every feature
    bank = features[chosen]
    expected = []
    for part in (slice(0, 2), slice(2, 5)):
        distances = torch.cdist(features[:, part].double(), bank[:, part].double())
        distances[owners[:, None] == owners[chosen][None]] = float("inf")  # not against its own image's rows
        expected.append(distances.min(1).values.mean())
    torch.testing.assert_close(scales, torch.stack(expected).float(), atol=1e-4, rtol=0)
    assert 5 < float(scales[1] / scales[0]) < 20
    # no other image to measure against: 1 for every block
    assert torch.equal(block_scales(features, chosen, (2, 3), torch.zeros(40, dtype=torch.long), seed=0), torch.ones(2))
    # features whose image alone is in the bank are left out of the mean
    alone = block_scales(features, torch.tensor([0, 1]), (2, 3), owners, seed=0, sample=40)
    rest = features[8:]
    expected = [torch.cdist(rest[:, part].double(), features[:2, part].double()).min(1).values.mean()
                for part in (slice(0, 2), slice(2, 5))]
    torch.testing.assert_close(alone, torch.stack(expected).float(), atol=1e-4, rtol=0)


def test_refined_nearest_distances_are_exact_where_the_expansion_cancels():
    # queries close to rare bank rows far from the bank's mean: the expansion loses ~0.4 here, the
    # refinement (the ONNX graph's) measures the nearest row's distance directly
    g = torch.Generator().manual_seed(0)
    rare = torch.randn(5, 64, generator=g) + 60.0
    bank = torch.cat([torch.randn(300, 64, generator=g), rare])
    queries = rare.repeat(20, 1) + 0.05 * torch.randn(100, 64, generator=g)
    exact = torch.cdist(queries.double(), bank.double()).min(dim=1).values
    assert (nearest_distances(queries, bank, refine=False).double() - exact).abs().max() > 0.01
    torch.testing.assert_close(nearest_distances(queries, bank, refine=True).double(), exact, atol=1e-5, rtol=0)


def test_nearest_distances_of_few_dimensions_are_exact():
    # block 0's 16 dimensions go through the k-d tree on the CPU: exact, even at a distance of 0, where the
    # distance matrices' |q|^2 - 2 q.m + |m|^2 in float32 leaves up to about 1e-3
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 16, generator=generator), torch.randn(500, 16, generator=generator)
    queries[:5] = bank[:5]
    distances = nearest_distances(queries, bank)
    assert distances.dtype == torch.float32 and distances.shape == (300,)
    expected = torch.cdist(queries.double(), bank.double()).min(dim=1).values.float()
    torch.testing.assert_close(distances, expected, atol=1e-5, rtol=0)
    assert float(distances[:5].max()) == 0.0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A folder of 10 defect-free textures and a fitted PatchCore run on it."""
    root = tmp_path_factory.mktemp("patchcore")
    return root, _fit_on_textures(root, 10, 128, Config(**SETTINGS))


def _fit_on_textures(root, count: int, size: int, config: Config):
    """`count` defect-free size x size textures under root/good, and a fit of `config` on them."""
    rng = np.random.default_rng(0)
    for i in range(count):
        write_png(root / "good" / f"{i}.png", texture_png(size, size, rng, period=9))
    return fit(config, root / "good", root / "run", progress=False)


def _with_blob(seed: int) -> tuple[np.ndarray, np.ndarray]:
    image = texture(128, 128, np.random.default_rng(seed), period=9)
    truth = np.zeros(image.shape, dtype=bool)
    truth[40:56, 70:90] = True
    image[truth] = 0.05  # a dark blot
    return image[:, :, None], truth


def test_patchcore_finds_a_planted_defect_and_passes_clean_images(planted):
    _, result = planted
    detector = load_detector(result.checkpoint, overrides={"device": "cpu"})
    for seed in range(100, 104):
        image, truth = _with_blob(seed)
        prediction = detector.predict(image)
        amap = prediction.anomaly_map
        assert prediction.defective and (prediction.mask & truth).any()
        assert amap[truth].mean() > 1.5 * amap[~truth].mean()
        y, x = np.unravel_index(amap.argmax(), amap.shape)
        assert 30 <= y < 66 and 60 <= x < 100  # the peak is at the blot
    clean = [detector.predict(texture(128, 128, np.random.default_rng(s), period=9)[:, :, None]) for s in range(200, 206)]
    assert sum(p.defective for p in clean) <= 1


def test_the_bank_round_trips_through_the_checkpoint(planted, tmp_path):
    _, result = planted
    checkpoint = Checkpoint.load(result.checkpoint)
    bank = checkpoint.weights["bank"]
    # small images at a size the user set: the usual blocks and pool, recorded by the fit
    assert checkpoint.config.patchcore_blocks == "4,10,14"
    assert checkpoint.config.coreset_pool == 250000
    assert bank.ndim == 2 and bank.shape[0] == 300 and bank.shape[1] == 40 + 112 + 192  # blocks 4, 10, 14
    assert checkpoint.config.patchcore_scoring == "joint" and checkpoint.weights["block_scales"].numel() == 0
    checkpoint.save(tmp_path / "copy.pt")
    network = Checkpoint.load(tmp_path / "copy.pt").network()
    assert torch.equal(network.bank, bank)
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(network(x), checkpoint.network()(x))


@pytest.fixture(scope="module")
def per_block(tmp_path_factory):
    """A PatchCore fitted with per-block scoring on 6 small textures."""
    config = Config(**{**SETTINGS, "image_size": "64x64", "memory_bank_size": 60, "patchcore_scoring": "per-block"})
    return _fit_on_textures(tmp_path_factory.mktemp("per_block"), 6, 64, config)


def test_per_block_scores_are_each_blocks_distance_over_its_scale_averaged(per_block, tmp_path):
    checkpoint = Checkpoint.load(per_block.checkpoint)
    bank, scales = checkpoint.weights["bank"], checkpoint.weights["block_scales"]
    assert checkpoint.config.patchcore_scoring == "per-block"
    assert scales.shape == (3,) and bool((scales > 0).all())
    checkpoint.save(tmp_path / "copy.pt")
    network = Checkpoint.load(tmp_path / "copy.pt").network()
    assert network.scoring == "per-block" and torch.equal(network.block_scales, scales)
    noise = torch.rand(1, 1, 64, 64)
    clean = torch.from_numpy(texture(64, 64, np.random.default_rng(300), period=9))[None, None]
    with torch.no_grad():
        scores = network(noise)
        torch.testing.assert_close(scores, checkpoint.network()(noise))
        # by hand: each block's nearest distance over its scale, averaged over the blocks
        queries = network.embed(noise)[0].flatten(1).T
        parts, banks = torch.split(queries, [40, 112, 192], dim=1), torch.split(bank, [40, 112, 192], dim=1)
        expected = sum(torch.cdist(q.double(), m.double()).min(1).values / s for q, m, s in zip(parts, banks, scales))
        torch.testing.assert_close(scores.flatten().double(), expected / 3, atol=1e-4, rtol=0)
        # in units of a training feature's typical distance from the other images' bank rows
        assert 0.3 < float(network(clean).median()) < 3 < float(scores.median())


def test_a_checkpoint_without_block_scales_scores_jointly(per_block, tmp_path):
    checkpoint = Checkpoint.load(per_block.checkpoint)
    del checkpoint.weights["block_scales"]  # as written before per-block scoring
    checkpoint.save(tmp_path / "old.pt")
    network = Checkpoint.load(tmp_path / "old.pt").network()
    assert network.scoring == "joint"
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        queries = network.embed(x)[0].flatten(1).T
        torch.testing.assert_close(network(x).flatten(), nearest_distances(queries, network.bank))


def test_per_block_scoring_is_a_setting_with_two_values():
    assert Config().patchcore_scoring == "joint"  # the paper's
    with pytest.raises(SettingError, match="patchcore_scoring 'sum' is not one of joint, per-block"):
        Config(patchcore_scoring="sum").validate()


@pytest.mark.slow
def test_onnx_export_of_per_block_scoring_agrees_with_torch(per_block, tmp_path):
    from ssimae.export import export_onnx

    path = export_onnx(per_block.checkpoint, tmp_path / "per_block.onnx")
    torch_detector = load_detector(per_block.checkpoint, overrides={"device": "cpu"})
    onnx_detector = load_detector(path, "onnxruntime", {"device": "cpu"})
    for seed in (1, 2):
        image = texture(64, 64, np.random.default_rng(seed), period=9)
        image[20:30, 30:40] = 0.05
        ours, expected = onnx_detector.anomaly_map(image[:, :, None]), torch_detector.anomaly_map(image[:, :, None])
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=0)
        assert ours.max() > 1.5  # the blot, in units of a typical training feature's distance


@pytest.mark.parametrize("backbone", ["resnet18", "wide_resnet50_2"])  # the latter: the PatchCore paper's
def test_a_resnet_patchcore_fits_and_its_checkpoint_needs_no_weights_file(fake_torchvision, tmp_path, backbone):
    weights = tmp_path / f"{backbone}.pth"
    torch.save(FakeResNet().state_dict(), weights)
    rng = np.random.default_rng(0)
    for i in range(5):
        write_png(tmp_path / "good" / f"{i}.png", texture_png(64, 64, rng, period=9))
    config = Config(**{**SETTINGS, "image_size": "64x64", "memory_bank_size": 20}, feature_net=backbone,
                    feature_weights=str(weights))
    result = fit(config, tmp_path / "good", tmp_path / "run", progress=False)
    checkpoint = Checkpoint.load(result.checkpoint)
    assert checkpoint.weights["bank"].shape == (20, 8 + 8)  # the fake's layer2 and layer3
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        before = checkpoint.network()(x)
        weights.unlink()  # the backbone's weights are in the checkpoint
        assert torch.equal(Checkpoint.load(result.checkpoint).network()(x), before)
    assert before.shape == (1, 1, 8, 8)  # layer2's stride 8


def test_nearest_distances_stay_float32_under_a_bf16_autocast():
    rng = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 344, generator=rng) + 3.0
    queries = bank[:200] + 0.05 * torch.randn(200, 344, generator=rng)
    exact = torch.cdist(queries.double(), bank.double()).min(1).values
    plain = nearest_distances(queries, bank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distances = nearest_distances(queries, bank)
    assert distances.dtype == torch.float32 and torch.equal(distances, plain)
    torch.testing.assert_close(distances.double(), exact, rtol=0, atol=1e-3)  # bf16 products: off by ~0.1


@pytest.mark.slow
def test_fits_are_deterministic_for_a_seed(planted, tmp_path):
    root, result = planted
    again = fit(Config(**SETTINGS), root / "good", tmp_path / "again", progress=False)
    a, b = Checkpoint.load(result.checkpoint), Checkpoint.load(again.checkpoint)
    assert torch.equal(a.weights["bank"], b.weights["bank"])
    assert a.thresholds.pixel == b.thresholds.pixel and a.thresholds.image == b.thresholds.image
    other = fit(Config(**{**SETTINGS, "seed": 1}), root / "good", tmp_path / "other", progress=False)
    assert not torch.equal(a.weights["bank"], Checkpoint.load(other.checkpoint).weights["bank"])


@pytest.mark.slow
def test_onnx_export_agrees_with_torch(planted, tmp_path):
    from ssimae.export import export_onnx

    _, result = planted
    path = export_onnx(result.checkpoint, tmp_path / "patchcore.onnx")
    torch_detector = load_detector(result.checkpoint, overrides={"device": "cpu"})
    onnx_detector = load_detector(path, "onnxruntime", {"device": "cpu"})
    for seed in (1, 2):
        image, _ = _with_blob(seed)
        resized = np.repeat(np.repeat(image, 2, axis=0), 3, axis=1)[:200, :300]  # not the working size
        for picture in (image, resized):
            ours, expected = onnx_detector.anomaly_map(picture), torch_detector.anomaly_map(picture)
            # Distances to the bank are ~40-90 here; the backbones' float32 convolutions differ in
            # summation order, so the agreement is relative: within 1e-5 (measured ~5e-6).
            np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=0)
            assert ours.max() > 1


def test_onnx_export_of_a_small_image_patchcore_agrees_with_torch(tmp_path):
    # block 0's 16 dimensions: torch searches with the k-d tree, the ONNX graph with distance matrices
    from ssimae.export import export_onnx

    rng = np.random.default_rng(0)
    for i in range(5):
        write_png(tmp_path / "good" / f"{i}.png", texture_png(40, 48, rng, period=9))
    result = fit(Config(**{**SETTINGS, "image_size": None}), tmp_path / "good", tmp_path / "run", progress=False)
    torch_detector = load_detector(result.checkpoint, overrides={"device": "cpu"})
    assert torch_detector.config.patchcore_blocks == "0"
    onnx_detector = load_detector(export_onnx(result.checkpoint, tmp_path / "small.onnx"), "onnxruntime",
                                  {"device": "cpu"})
    for seed in (1, 2):
        picture = texture(40, 48, np.random.default_rng(seed), period=9)[:, :, None]
        picture[10:16, 20:26] = 0.0  # a dark spot
        ours, expected = onnx_detector.anomaly_map(picture), torch_detector.anomaly_map(picture)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
        assert ours.max() > 0.1


@pytest.mark.slow
def test_exporting_a_patchcore_of_varying_image_sizes_is_refused(planted, tmp_path):
    from ssimae.errors import SsimaeError
    from ssimae.export import export_onnx

    root, _ = planted
    result = fit(Config(**{**SETTINGS, "image_size": "keep"}), root / "good", tmp_path / "keep", progress=False)
    with pytest.raises(SsimaeError, match="fixed working size"):
        export_onnx(result.checkpoint, tmp_path / "x.onnx")


def test_only_a_seeded_random_pool_of_the_features_enters_the_coreset():
    from ssimae.patchcore import fit_patchcore

    rng = np.random.default_rng(0)
    images = [texture(64, 64, rng, period=9)[:, :, None] for _ in range(3)]
    config = Config(**{**SETTINGS, "image_size": "64x64", "memory_bank_size": 40, "coreset_pool": 40})
    model = fit_patchcore(config, images, 1, torch.device("cpu"), progress=False)
    with torch.no_grad():
        features = torch.cat([model.embed(torch.from_numpy(im).permute(2, 0, 1)[None])[0].flatten(1).T for im in images])
    assert features.shape[0] == 3 * 8 * 8
    matches = torch.cdist(model.bank, features, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    assert matches.values.max() < 1e-4 and len(set(matches.indices.tolist())) == 40  # 40 distinct features
    again = fit_patchcore(config, images, 1, torch.device("cpu"), progress=False)
    assert torch.equal(again.bank, model.bank)
    other = fit_patchcore(Config(**{**config.to_dict(), "seed": 1}), images, 1, torch.device("cpu"), progress=False)
    assert not torch.equal(other.bank, model.bank)


def test_the_streamed_pool_is_the_seeded_sample_of_all_features_concatenated():
    from ssimae.patchcore import feature_counts, fit_patchcore, greedy_coreset

    rng = np.random.default_rng(1)
    images = [texture(h, w, rng, period=7)[:, :, None] for h, w in ((64, 64), (40, 72), (64, 64), (33, 50))]
    config = Config(**{**SETTINGS, "image_size": "keep", "memory_bank_size": 30, "coreset_pool": 100})
    model = fit_patchcore(config, images, 1, torch.device("cpu"), progress=False)
    with torch.no_grad():  # the reference: every feature held at once, then the seeded sample
        every = [model.embed(torch.from_numpy(im).permute(2, 0, 1)[None])[0].flatten(1).T for im in images]
    assert feature_counts(model, images) == [f.shape[0] for f in every]
    every = torch.cat(every)
    keep = torch.randperm(every.shape[0], generator=torch.Generator().manual_seed(config.seed))[:100].sort().values
    pool = every[keep]
    expected = pool[greedy_coreset(pool, 30, config.coreset_projection, config.seed)]
    assert torch.equal(model.bank, expected)
    whole = fit_patchcore(Config(**{**config.to_dict(), "memory_bank_size": 100}), images, 1, torch.device("cpu"),
                          progress=False)
    assert torch.equal(whole.bank, pool)  # a bank as large as the pool keeps every pool row, in order
    rgb = [np.repeat(im, 3, axis=2) for im in images[:2]]  # under the pool: every feature, in image order
    small = fit_patchcore(Config(**{**config.to_dict(), "coreset_pool": 10**6, "memory_bank_size": 10**6}), rgb, 3,
                          torch.device("cpu"), progress=False)
    with torch.no_grad():
        assert torch.equal(small.bank, torch.cat([small.embed(torch.from_numpy(im).permute(2, 0, 1)[None])[0]
                                                  .flatten(1).T for im in rgb]))


def test_a_memory_method_reads_its_training_images_on_access(tmp_path):
    from ssimae.train import LazyImages, load_images

    rng = np.random.default_rng(0)
    paths = [write_png(tmp_path / f"{i}.png", texture_png(40 + 8 * i, 48, rng)) for i in range(3)]
    config = Config(**{**SETTINGS, "image_size": "96"})
    lazy, held = LazyImages(paths, config), load_images(paths, config)
    assert len(lazy) == 3 and all(np.array_equal(a, b) for a, b in zip(lazy, held))
    assert [im.shape for im in lazy[1:]] == [im.shape for im in held[1:]]


def test_the_working_size_blocks_and_pool_change_for_small_images_only(tmp_path):
    rng = np.random.default_rng(0)
    small = [write_png(tmp_path / "small" / f"{i}.png", texture_png(96, 64, rng)) for i in range(3)]
    large = [write_png(tmp_path / "large" / f"{i}.png", texture_png(300 + 10 * i, 200, rng)) for i in range(3)]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert default_image_size(small + [tmp_path / "broken.png"]) == "512x768"  # 8 x (64 wide, 96 high)
    assert default_image_size(large) == "256x256"
    assert default_image_size([tmp_path / "broken.png"]) == "256x256"
    assert default_blocks(small + [tmp_path / "broken.png"]) == "0"
    assert default_blocks(large) == default_blocks([tmp_path / "broken.png"]) == "4,10,14"
    assert image_defaults(small).pool == 50000
    assert image_defaults(large).pool == image_defaults([tmp_path / "broken.png"]).pool == 250000
    tiny = [write_png(tmp_path / "tiny" / f"{i}.png", texture_png(5, 3, rng)) for i in range(3)]
    assert default_image_size(tiny) == "33x55"  # 8x would be under the 32-px minimum: 11x (3 wide, 5 high)


def test_a_config_without_blocks_builds_the_default_blocks():
    # what a PatchCore built outside a fit (which records its blocks) gets: stages 3, 4 and 5
    model = build_patchcore(Config(method="patchcore"), 1)
    assert model.backbone.taps == (4, 10, 14)


def test_a_fit_records_the_working_size_it_chose(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        write_png(tmp_path / "good" / f"{i}.png", texture_png(40, 48, rng, period=9))
    result = fit(Config(**{**SETTINGS, "image_size": None}), tmp_path / "good", tmp_path / "run", progress=False)
    checkpoint = Checkpoint.load(result.checkpoint)
    assert checkpoint.config.image_size == "384x320"  # 8 x (48 wide, 40 high), used by predict too
    assert checkpoint.config.patchcore_blocks == "0"
    assert checkpoint.config.coreset_pool == 50000
    explicit = fit(Config(**{**SETTINGS, "image_size": None, "patchcore_blocks": "4", "coreset_pool": 1000}),
                   tmp_path / "good", tmp_path / "run4", progress=False)
    assert Checkpoint.load(explicit.checkpoint).config.patchcore_blocks == "4"  # a setting given wins
    assert Checkpoint.load(explicit.checkpoint).config.coreset_pool == 1000
    empty = fit(Config(**{**SETTINGS, "image_size": None, "patchcore_blocks": ""}), tmp_path / "good",
                tmp_path / "run-empty", progress=False)
    assert Checkpoint.load(empty.checkpoint).config.patchcore_blocks == "0"  # set empty = not set
    detector = load_detector(result.checkpoint, overrides={"device": "cpu"})
    assert detector.preprocess(np.zeros((40, 48, 1), np.float32)).shape == (320, 384, 1)


# --------------------------------------------------------------------------- the blur floor


def test_blur_taps_and_map_by_hand():
    taps = gaussian_taps(1.0)
    assert len(taps) == 9 and taps.sum() == pytest.approx(1.0)  # radius int(4 * 1 + 0.5) = 4
    assert taps[4] / taps[3] == pytest.approx(np.exp(0.5))  # exp(-x^2 / 2): ratio of x = 0 and x = 1
    # A single bright pixel on black: the blur leaves taps[4]^2 of it in place, so the map there is
    # 1 - taps[4]^2; a neighbour one step away gets taps[4] * taps[3] of it.
    image = torch.zeros(1, 1, 21, 21)
    image[0, 0, 10, 10] = 1.0
    amap = BlurResidual(1.0)(image)[0, 0]
    assert float(amap[10, 10]) == pytest.approx(1 - taps[4] ** 2, abs=1e-6)
    assert float(amap[10, 11]) == pytest.approx(taps[4] * taps[3], abs=1e-6)


def test_blur_floor_equals_scipy_with_the_detector_smoothing():
    image = texture(90, 110, np.random.default_rng(3))
    config = Config(method="blur")
    expected = ndimage.gaussian_filter(np.abs(image - ndimage.gaussian_filter(image.astype(np.float64), 8,
                                                                              mode="reflect")), 2, mode="reflect")
    from ssimae.detector import Detector, grid_map_fn

    detector = Detector(config, grid_map_fn(lambda x: BlurResidual(config.blur_sigma)(x)), None, 1)
    np.testing.assert_allclose(detector.anomaly_map(image[:, :, None]), expected, atol=1e-5)


@pytest.mark.parametrize("length, pad", [(7, 3), (5, 12), (1, 4), (2, 9)])
def test_symmetric_pad_mirrors_like_numpy_also_beyond_the_axis(length, pad):
    from ssimae.blur import symmetric_pad

    x = torch.arange(float(length)).reshape(1, 1, 1, length).expand(1, 1, 2, length)
    expected = np.pad(x.numpy(), [(0, 0), (0, 0), (0, 0), (pad, pad)], mode="symmetric")
    np.testing.assert_array_equal(symmetric_pad(x, pad, 3).numpy(), expected)


def test_an_exported_blur_floor_takes_images_thinner_than_its_radius(tmp_path):
    from ssimae.export import export_onnx

    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(tmp_path / "good" / f"{i}.png", texture_png(160, 192, rng))
    result = fit(Config(method="blur", val_fraction=0.0), tmp_path / "good", tmp_path / "run", progress=False)
    torch_detector = load_detector(result.checkpoint, overrides={"device": "cpu"})
    onnx_detector = load_detector(export_onnx(result.checkpoint, tmp_path / "blur.onnx"), "onnxruntime")
    for height, width in [(20, 300), (300, 20), (5, 5)]:  # the radius at sigma 8 is 32
        image = texture(height, width, rng)[:, :, None]
        np.testing.assert_allclose(onnx_detector.anomaly_map(image), torch_detector.anomaly_map(image), atol=1e-5)


def test_a_vgg_is_refused_as_a_patchcore_backbone_naming_the_ones_accepted(tmp_path):
    config = Config(**SETTINGS, feature_net="vgg16", feature_weights=str(tmp_path / "vgg16.pth"))
    with pytest.raises(SettingError, match="'vgg16' cannot be a PatchCore backbone.*WideResNet"):
        build_patchcore(config, channels=1)
