# nekojump in a container, for the docker host "alongside other community services".
# Run with host networking (see etc/compose.yaml) so forwards bind on the mesh address.
FROM python:3.11-slim-bookworm

RUN useradd --system --create-home --home-dir /var/lib/nekojump nekojump \
    && install -d -o nekojump -g nekojump -m 0700 /var/lib/nekojump

COPY . /src/nekojump
RUN pip install --no-cache-dir /src/nekojump && rm -rf /src/nekojump

COPY etc/nekojump.toml /etc/nekojump/nekojump.toml
VOLUME /var/lib/nekojump
USER nekojump
WORKDIR /var/lib/nekojump

# The same command the systemd unit runs.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "--logger=nekojump.logs.text_observer", "nekojump"]
CMD ["--config", "/etc/nekojump/nekojump.toml"]
