"""Networks: the model factory and the architectures the method runs.

models (the factory: SDXL pipelines from a hub id, a local folder or a seeded tiny twin), pretrained (real
files setup fetches from registry packages), tokenizer (the world's and CLIP's), poster (expression), fer
(FER2013 second opinion), identity (ArcFace-style, SFace, dlib), retinaface and faces (detection),
watermark, dctnet, stylizers. Imports core only.
"""
