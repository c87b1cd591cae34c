"""A small text-to-image world that really learned its concepts: the measuring stick for diffusion erasure.

Scenes of one textured shape (6 shapes x 6 colours x 4 fill styles, 32x32 RGB) are generated in
code; a real ``StableDiffusionPipeline`` (tiny UNet + tiny AutoencoderKL trained here, the real
frozen all-MiniLM-L6-v2 as text encoder) was trained on their captions; a small CNN detector
judges what a generated image shows. ``load_world()`` returns all of it, plus the training /
retain / held-out prompt sets guards calibrate and are attacked with. See docs/diffusion-world.md.
"""

from erasekit.testing.diffusion_world.scenes import CONCEPTS, FAMILIES, all_concepts, family_of
from erasekit.testing.diffusion_world.world import PromptSpec, World, default_weights_dir, load_world

__all__ = [
    "CONCEPTS",
    "FAMILIES",
    "PromptSpec",
    "World",
    "all_concepts",
    "default_weights_dir",
    "family_of",
    "load_world",
]
