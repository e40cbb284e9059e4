"""Stage 2, instruction tuning: train the projection and the whole LLM on image conversations,
starting from the stage-1 weights (out/pretrain_vlm_512.pth)."""
from trainer.config import build_parser, parse

if __name__ == "__main__":
    cfg = parse(build_parser(__doc__, data_path="dataset/sft_i2t.parquet", epochs=2, batch_size=8,
                             learning_rate=1e-5, max_seq_len=1536, from_weight="pretrain_vlm", save_weight="sft_vlm",
                             freeze_llm=0))
    from trainer.main import launch  # torch and the rest load only now: --help and a mistyped flag answer at once
    launch(cfg)
