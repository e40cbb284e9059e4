"""The training shared by train_pretrain_vlm.py and train_sft_vlm.py, one idea a file.

The two stages differ only in data, defaults and what is trainable, so both scripts give
config.build_parser their defaults and parse their flags into a TrainConfig before importing
anything that loads torch (seconds), then call main.launch(cfg), which runs loop.train(cfg):

    cluster = setup_distributed(cfg)    # distributed.py: one process, torchrun (DDP) or deepspeed
    run = build_run(cfg, cluster)       # build.py: model and tower, data, engine, checkpointer, logger
    train_epochs(run)                   # loop.py: train_step, then log_and_save, once per step
    run.checkpointer.save(state, "final")   # checkpoints.py

    config.py       the flags, written once as TrainConfig fields (no torch: --help answers at once)
    main.py         launch(cfg): train, and report an error meant for the user as one line
    errors.py       StopTraining, and which errors are the user's
    loop.py         the training loop, top to bottom
    schedule.py     epochs cut into optimizer steps, and the learning rate along them
    build.py        a run built from its config: model, data, engine, checkpointer, logger
    engines.py      how forward/backward/step run: plain PyTorch (one process or DDP) or DeepSpeed
    distributed.py  this process among the others, and the random streams
    checkpoints.py  the .pth weights and the resume state, written atomically
    logs.py         log lines and records, and the log a resumed run continues

This file imports nothing, so that `import trainer.config` loads no torch.
"""
