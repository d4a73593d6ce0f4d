"""Text-to-image LoRA files: the kohya-ss and diffusers layouts of SD 1.x/2.x, SDXL and Flux.

Every module is read under one canonical name per base architecture: the diffusers module path
behind its pipeline component (``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``transformer.``),
e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. So a kohya file (in
diffusers or SGM block naming) and a diffusers file of the same base share their modules.

A convolution LoRA (down ``r × in × kh × kw``, up ``out × r × 1 × 1``) is the matrix update
ΔW = up[:, :, 0, 0] @ down.flatten(1) of shape ``out × (in·kh·kw)``, and is consolidated as
such; the kernel shape is kept in the task record so that extraction writes the conv form back.
Flux kohya files fuse projections (``img_attn_qkv``, ``linear1``): they are read as the diffusers
modules they fuse (the rows of ``up`` split, ``down`` shared), and fused again when written.

PEFT adapters of a UNet or Flux transformer are read under the same names
(:class:`~share_convert.io.t2i.source.PeftComponentSource`), so they consolidate with kohya and
diffusers files of their base.

The source format, base, naming, kernel shapes and kohya ``ss_*`` metadata of each task go into
its task record (the checkpoint's manifest), which extraction reads back. User guide:
docs/text-to-image.md.

Modules: :mod:`.naming` (module names, both ways), :mod:`.parsing` (a file's header),
:mod:`.source` (files and PEFT component adapters as inputs), :mod:`.writing` (kohya and diffusers files).
"""
