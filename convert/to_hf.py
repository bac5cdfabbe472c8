"""Any MARLIN checkpoint -> a Hugging Face folder (`config.json` + `model.safetensors`) that the
port's `MarlinModel.from_pretrained(folder)` (ControlNet/MARLIN `hf_src/`) loads."""

from __future__ import annotations

import argparse

from convert.arguments import add_source_arguments
from marlin_jax.interop import load_checkpoint, resolve_checkpoint_config, save_hf_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--output", required=True, help="the folder to write (config.json + model.safetensors)")
    parser.add_argument("--with_decoder", action="store_true",
                        help="also write the decoder of a full model (as_feature_extractor: false); "
                             "default: the encoder only, as the published port")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model.safetensors")


def run(args: argparse.Namespace) -> int:
    config, name = resolve_checkpoint_config(args.model, args.input)
    model = load_checkpoint(args.input, config)
    if args.with_decoder and model.decoder is None:
        raise ValueError(f"{args.input}: --with_decoder, but the checkpoint holds no decoder")
    out = save_hf_checkpoint(args.output, model, encoder_only=not args.with_decoder,
                             overwrite=args.overwrite)
    print(f"{args.input} -> {out} ({name}, {'with decoder' if args.with_decoder else 'encoder only'})")
    return 0
