from setuptools import setup

setup(
    name="nekojump",
    version="0.1.0",
    description="SSH jumphost for tunnel-only remote forwards on a private mesh",
    python_requires=">=3.11",
    packages=["nekojump", "nekojump.ssh", "twisted.plugins"],
    package_data={"nekojump": ["schema/*.sql"]},
    install_requires=[
        "Twisted[conch]>=24.7",
        "pyasn1",
        "cryptography",
        "klein",
        "attrs",
    ],
    extras_require={
        "test": ["pytest", "pytest-twisted", "ruff"],
    },
    entry_points={
        "console_scripts": ["nekojump-admin = nekojump.admin:main"],
    },
)
