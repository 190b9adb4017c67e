"""Train a stage: ``python train.py --stage {sft,reward,dpo,ppo,grpo,rloo} [--config configs/<stage>.yaml]``,
or run ``--stage eval`` (one policy's held-out report) or ``--stage pipeline`` (the whole demo)."""

from shraygpt_rl.cli import main

if __name__ == "__main__":
    main()
