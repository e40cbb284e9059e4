"""Stage 1, caption alignment: teach the projection (and the last LLM layer) to map the vision
tower's patch features into the LLM's embedding space, from a pretrained MiniMind LLM (out/lm_512.pth)."""
from trainer.config import build_parser, parse

if __name__ == "__main__":
    cfg = parse(build_parser(__doc__, data_path="dataset/pretrain_i2t.parquet", epochs=4, batch_size=16,
                             learning_rate=4e-4, max_seq_len=640, from_weight="lm", save_weight="pretrain_vlm",
                             freeze_llm=1))
    from trainer.main import launch  # torch and the rest load only now: --help and a mistyped flag answer at once
    launch(cfg)
