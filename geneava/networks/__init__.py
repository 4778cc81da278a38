"""Networks: the model factory and the architectures the method runs.

models (the factory: SDXL pipelines from a hub id, a local folder or a seeded tiny twin), tokenizer, poster
(expression), identity (ArcFace-style and dlib), retinaface and faces (detection), watermark, dctnet.
Imports core only.
"""
