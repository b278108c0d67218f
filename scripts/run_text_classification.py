#!/usr/bin/env python
"""Fine-tune a text classifier with multi-step SAM (HF examples style; works under `accelerate launch`).

    python scripts/run_text_classification.py --dataset_name embedded:rotten_tomatoes \
        --model_name_or_path embedded:minilm --output_dir out/rt --do_train --do_eval --sam_ascent_steps 2
    python scripts/run_text_classification.py --dataset_name glue --dataset_config_name sst2 \
        --model_name_or_path bert-base-uncased --output_dir out/sst2 --do_train --do_eval

A single .json or .yaml argument is read as a config file. Every TrainingArguments flag and every
--sam_* flag works; --use_peft --lora_r 8 (TRL's and PEFT's names) trains LoRA adapters and the head.
"""

from hf_sam.tasks.run import main

if __name__ == "__main__":
    main("text")
