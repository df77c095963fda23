"""Feature extraction: timm backbones for images, a local sentence-embedding model for text."""
