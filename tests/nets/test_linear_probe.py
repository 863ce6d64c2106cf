"""LinearProbe: only the head trains; the frozen body keeps its weights and BatchNorm statistics."""

import pytest
import torch
import torch.nn.functional as F

from lightning_robust.nets import LinearProbe, ResNet32, SmallCNN


def test_only_the_head_changes_and_batchnorm_stays_frozen(tmp_path):
    torch.manual_seed(0)
    net = ResNet32(num_classes=3)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    fresh = ResNet32(num_classes=3)
    probe = LinearProbe(fresh, head="linear", checkpoint=str(tmp_path / "w.pt"))
    before = {k: v.clone() for k, v in probe.net.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"net.linear.weight", "net.linear.bias"}
    probe.train()
    assert probe.training and not probe.net.bn1.training and probe.net.linear.training
    opt = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        opt.step()
    after = probe.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"linear.weight", "linear.bias"}  # running means and variances included in "unchanged"
    assert probe.num_classes == 3 and probe.feature_layer == "net.pool"


def test_reset_head_and_bad_head():
    torch.manual_seed(0)
    net = SmallCNN(input_size=8)
    w = net.classifier[4].weight.clone()
    probe = LinearProbe(net, head="classifier.4", reset_head=True)
    assert not torch.equal(probe.net.classifier[4].weight, w)
    with pytest.raises(ValueError, match="layer 'fc' does not exist"):
        LinearProbe(SmallCNN(input_size=8), head="fc")
