#!/usr/bin/env python
"""Fine-tune an image classifier with multi-step SAM (HF examples style; works under `accelerate launch`).

    python scripts/run_image_classification.py --dataset_name embedded:mnist5k --model_type vit \
        --output_dir out/mnist --do_train --do_eval --sam_ascent_steps 2
    python scripts/run_image_classification.py --dataset_name cifar10 \
        --model_name_or_path google/vit-base-patch16-224-in21k --output_dir out/cifar10 --do_train --do_eval

A single .json or .yaml argument is read as a config file. Every TrainingArguments flag and every
--sam_* flag works.
"""

from hf_sam.tasks.run import main

if __name__ == "__main__":
    main("image")
