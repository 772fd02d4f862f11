from setuptools import setup

setup(
    name="nekojump",
    version="0.1.0",
    description="SSH jumphost for tunnel-only remote forwards on a private mesh",
    python_requires=">=3.11",
    packages=["nekojump", "nekojump.ssh", "nekojump.web", "nekojump.assets", "twisted.plugins"],
    # The top-level web/ folder (templates, static files) installs as nekojump.assets.
    package_dir={"nekojump.assets": "web"},
    package_data={
        "nekojump": ["schema/*.sql"],
        "nekojump.assets": ["templates/*.html", "static/*"],
    },
    install_requires=[
        "Twisted[conch]>=24.7",
        "pyasn1",
        "cryptography",
        "klein",
        "attrs",
        "jinja2",
        "prometheus-client",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-twisted",
            "ruff",
            "treq",
            "selenium",
            "openapi-spec-validator",
            "hypothesis",
        ],
    },
    entry_points={
        "console_scripts": ["nekojump-admin = nekojump.admin:main"],
    },
)
