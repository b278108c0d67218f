#!/usr/bin/env python
"""Instruction-tune a causal LM with multi-step SAM through TRL's SFTTrainer (works under `accelerate launch`).

    # offline: a GPT-2 from a config on the embedded arithmetic instructions
    python scripts/run_sft.py --output_dir out/sft --do_eval --max_steps 300 --learning_rate 3e-3 \
        --sam_ascent_steps 2
    # the hub, with LoRA adapters
    accelerate launch scripts/run_sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \
        --output_dir out/qwen-sft --use_peft --lora_r 16 --bf16 --sam_ascent_steps 1 --sam_rho 0.05

Every SFTConfig flag (TRL's defaults kept), every TRL ModelConfig flag (--use_peft, --lora_*) and
every --sam_* flag works; a single .json or .yaml argument is read as a config file.
"""

from hf_sam.tasks.sft import main

if __name__ == "__main__":
    main()
