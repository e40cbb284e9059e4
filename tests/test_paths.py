"""Default folders are named relative to the repository: every script works from any folder, and a
missing tokenizer or tower is one line naming the flag."""
import os
import shutil

import pytest

from model import paths


def test_the_default_tokenizer_is_found_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists("model")
    tokenizer = paths.load_tokenizer("model")  # the trainers' and eval's default
    assert len(tokenizer) > 0 and os.path.samefile(paths.local_path("model"), os.path.join(paths.REPO_ROOT, "model"))


def test_a_folder_of_the_current_directory_wins_over_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    assert paths.local_path("model") == "model"


def test_a_missing_tokenizer_names_the_flag_and_never_asks_a_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer at 'jingyaogong/minimind' \(set --tokenizer_path\)"):
        paths.load_tokenizer("jingyaogong/minimind")  # a hub-like name is not looked up online


def test_the_default_tower_path_is_found_from_another_folder(tower_dir, tmp_path, monkeypatch):
    from model.model_vlm import load_vision_tower
    repo = tmp_path / "repo"
    shutil.copytree(tower_dir, repo / "model" / "vision_model" / "tower")
    monkeypatch.setattr(paths, "REPO_ROOT", str(repo))
    monkeypatch.chdir(tmp_path)
    assert load_vision_tower("model/vision_model/tower").config.hidden_size > 0
    with pytest.raises(FileNotFoundError, match="--vision_model_path"):
        load_vision_tower("model/vision_model/missing")


def test_a_weight_name_is_found_in_the_repositorys_out_from_another_folder(tmp_path, monkeypatch):
    from model.checkpoint import weight_path
    repo, here = tmp_path / "repo", tmp_path / "here"
    (repo / "out").mkdir(parents=True)
    (repo / "out" / "sft_vlm_512.pth").write_bytes(b"")
    here.mkdir()
    monkeypatch.setattr(paths, "REPO_ROOT", str(repo))
    monkeypatch.chdir(here)
    assert weight_path("out", "sft_vlm", 512, 0) == str(repo / "out" / "sft_vlm_512.pth")
    assert weight_path("out", "sft_vlm", 768, 0) == "out/sft_vlm_768.pth"  # nowhere: named as given
    (here / "out").mkdir()
    (here / "out" / "sft_vlm_512.pth").write_bytes(b"")
    assert weight_path("out", "sft_vlm", 512, 0) == "out/sft_vlm_512.pth"  # the current folder's wins
