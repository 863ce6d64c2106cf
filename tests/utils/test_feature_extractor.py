import pytest
import torch

from lightning_robust.utils import FeatureExtractor


def test_captures_the_named_layer_output(tiny_cnn, tiny_images):
    x, _ = tiny_images
    # Reference: run the layers by hand up to the penultimate ReLU.
    ref = tiny_cnn.classifier[:4](tiny_cnn.features(tiny_cnn.normalize(x)))
    with FeatureExtractor(tiny_cnn, "classifier.3") as fx:
        logits = tiny_cnn(x)
        assert torch.allclose(fx.features, ref)
    assert torch.allclose(logits, tiny_cnn(x))
    assert torch.allclose(FeatureExtractor(tiny_cnn, "classifier.3")(x), ref)


def test_hook_removed_on_exit_and_on_exception(tiny_cnn, tiny_images):
    layer = tiny_cnn.get_submodule("classifier.3")
    with FeatureExtractor(tiny_cnn, "classifier.3"):
        assert len(layer._forward_hooks) == 1
    assert len(layer._forward_hooks) == 0
    def fail_inside() -> None:
        with FeatureExtractor(tiny_cnn, "classifier.3"):
            assert len(layer._forward_hooks) == 1
            raise KeyError("boom")

    with pytest.raises(KeyError):
        fail_inside()
    assert len(layer._forward_hooks) == 0
    fx = FeatureExtractor(tiny_cnn, "classifier.3")
    with pytest.raises(RuntimeError):
        fx(torch.rand(2, 3, 8, 8))  # wrong channel count fails inside forward
    assert len(layer._forward_hooks) == 0


def test_gradients_flow_when_not_detached(tiny_cnn, tiny_images):
    x, _ = tiny_images
    x = x.clone().requires_grad_(True)
    with FeatureExtractor(tiny_cnn, "features.1", detach=False) as fx:
        tiny_cnn(x)
        fx.features.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_layer_name_lists_valid_names(tiny_cnn):
    msg = r"layer 'classifer.3' does not exist in SmallCNN; closest names: 'classifier.3'"
    with pytest.raises(ValueError, match=msg):
        FeatureExtractor(tiny_cnn, "classifer.3")
    with pytest.raises(ValueError, match="valid names include: 'normalize', 'features'"):
        FeatureExtractor(tiny_cnn, "zzz")


def test_features_before_forward_is_an_error(tiny_cnn):
    with FeatureExtractor(tiny_cnn, "classifier.3") as fx, pytest.raises(RuntimeError, match="no forward pass"):
        _ = fx.features
