"""The Ingress's prompt decoder (``prompt_decoding: ingress``) answers a click exactly as the Segmenter would: the
features shipped as arrays, decoded by a separately loaded copy of the same SAM2 (as in another process), give the
same mask and score as the Segmenter's decode on its own embedding; unknown images are a KeyError and the LRU keeps
``capacity`` images. The Segmenter's prepare/segment protocol is checked in-process too."""

import asyncio

import numpy as np
import pytest


@pytest.fixture(scope="module")
def image_u8():
    from rau_ray.data.phantoms import get_phantom
    from rau_ray.models.prompts import to_pil

    slices = get_phantom("ct-abdomen").generate_2d(3, 11, size=96, slices=3)
    sample = max(slices, key=lambda s: int((s.label == 1).sum()))
    return np.asarray(to_pil(sample.image, "CT")), sample.label == 1


def test_ingress_decode_equals_segmenter_decode(image_u8):
    from rau_ray.models.rau import image_digest
    from rau_ray.serve.deployments import load_segmenter
    from rau_ray.serve.prompt_decoder import PromptDecoder, decode_prompts, features_to_numpy

    image, _ = image_u8
    _, segmenter = load_segmenter("tiny", None, None, "cpu")  # the Segmenter replica's model
    embedding = segmenter.set_image(image)
    decoder = PromptDecoder(load_segmenter("tiny", None, None, "cpu")[1], capacity=2)  # the Ingress's own copy
    key = image_digest(image)
    with pytest.raises(KeyError):
        decoder.predict(key, [[30, 40]], [1])
    decoder.put(key, features_to_numpy(embedding))
    for points, labels, box in [([[30, 40]], [1], None), ([[30, 40], [60, 20]], [1, 0], None),
                                (None, None, [10, 12, 70, 80]), ([[40, 45]], [1], [10, 12, 70, 80])]:
        want_mask, want_score = decode_prompts(segmenter.predictor, embedding, points, labels, box)
        got = decoder.predict(key, points, labels, box)
        assert got.mask.shape == image.shape[:2] and got.mask.dtype == bool
        np.testing.assert_array_equal(got.mask, want_mask)
        assert got.score == pytest.approx(want_score, abs=1e-5)
    for other in ("b", "c"):  # capacity 2: the least recently used image is dropped
        decoder.put(other, features_to_numpy(embedding))
    assert key not in decoder and "b" in decoder and "c" in decoder


def test_segmenter_prepare_then_segment(image_u8):
    """``prepare`` (embeddings + reference memory, sent while the Policy generates) and ``segment`` with the <Seg>
    state give the mask of one ``segment`` call with the images; a token prepared elsewhere is ``NotHeld``."""
    import torch

    from rau_ray.serve.deployments import Segmenter
    from rau_ray.serve.messages import Answer, NotHeld, Segmentation

    image, ref_mask = image_u8
    seg = Segmenter.func_or_class(profile="tiny")
    hidden = torch.randn(1, seg.seg.cfg.llm_hidden_size, generator=torch.Generator().manual_seed(0)).numpy()

    async def run():
        await seg.prepare("t1", image, image, ref_mask)
        assert "t1" in seg._prepared
        prepared = await seg.segment("t1", Answer("<Seg>", None, None, seg_hidden=hidden))
        assert "t1" not in seg._prepared
        direct = await seg.segment("t2", hidden, image, image, ref_mask)
        missing = await seg.segment("t3", hidden)
        return prepared, direct, missing

    prepared, direct, missing = asyncio.run(run())
    assert isinstance(prepared, Segmentation) and isinstance(direct, Segmentation)
    np.testing.assert_array_equal(prepared.mask, direct.mask)
    assert prepared.score == pytest.approx(direct.score)
    assert prepared.cached is False and direct.cached is True  # the encoder ran once, in prepare
    assert isinstance(missing, NotHeld)
