"""Backbones from checkpoints: official-style plain backbone dicts (architecture inferred) and full checkpoints."""
import pytest
import torch

from dinokernels.eval.loading import infer_vit_arch, load_backbone
from dinokernels.models.dino import DINOHead, MultiCropWrapper, build_backbone


def test_plain_backbone_dict_architecture_inferred(tmp_path):
    model, _ = build_backbone("vit_nano", patch_size=8, img_size=16)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    assert infer_vit_arch(model.state_dict()) == ("vit_nano", 8, 16)
    loaded, config, _ = load_backbone(str(tmp_path / "plain.pth"))
    assert config is None and not loaded.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_official_style_full_checkpoint_teacher_and_student(tmp_path):
    backbone, dim = build_backbone("vit_nano", patch_size=4, img_size=16)
    teacher = MultiCropWrapper(backbone, DINOHead(dim, 32, hidden_dim=16, bottleneck_dim=8))
    student = {"module." + k: v + 1 for k, v in teacher.state_dict().items()}  # DDP prefix, as official
    torch.save({"teacher": teacher.state_dict(), "student": student, "epoch": 3}, tmp_path / "full.pth")
    t, _, _ = load_backbone(str(tmp_path / "full.pth"), "teacher")
    s, _, _ = load_backbone(str(tmp_path / "full.pth"), "student")
    assert torch.equal(t.pos_embed, backbone.pos_embed) and torch.equal(s.pos_embed, backbone.pos_embed + 1)
    with pytest.raises(ValueError, match="which"):
        load_backbone(str(tmp_path / "full.pth"), "head")
