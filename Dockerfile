# One image for the vkernel daemon and every client (vkernel, vkctl, vkernel-demo).
#
# Built by scripts/build_image.sh (`make image`), which first prepares a wheelhouse on the
# host in .build/wheels/ (deps/: runtime dependencies, project/: the vkernel wheel); the
# build itself needs no network. BASE_IMAGE must provide python3 (3.11) with the venv module:
# python:3.11-slim where a registry is reachable, else the local vkernel-base:<suite> made by
# scripts/make_base_image.sh.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_INDEX=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The runtime dependencies, in a stage of their own so that the wheels never reach the final
# image and this work is redone only when the dependency set changes. setuptools is not
# needed at run time; pip stays, to install the project wheel below.
COPY .build/wheels/deps/ /wheels/deps/
RUN python3 -m venv /opt/vkernel \
    && /opt/vkernel/bin/pip install --find-links /wheels/deps /wheels/deps/*.whl \
    && /opt/vkernel/bin/pip uninstall -q -y setuptools

FROM ${BASE_IMAGE}
ENV PIP_NO_INDEX=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Daemon and clients run as the same unprivileged uid, so the UNIX socket the daemon creates
# in the shared /run/vkernel volume is usable by the client containers. A named volume
# mounted there starts as a copy of this directory, ownership included.
RUN groupadd --system --gid 10001 vkernel \
    && useradd --system --uid 10001 --gid vkernel --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin vkernel \
    && mkdir -p /run/vkernel /run/vkernel-secrets \
    && chown vkernel:vkernel /run/vkernel \
    && chmod 0750 /run/vkernel
COPY --from=deps /opt/vkernel /opt/vkernel
ENV VIRTUAL_ENV=/opt/vkernel \
    PATH=/opt/vkernel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
EXPOSE 50051
CMD ["vkernel", "serve", "--listen", "unix:///run/vkernel/vkernel.sock"]
# The project last: a source change redoes only these three steps (each step of the classic
# builder costs seconds, so the metadata above comes first).
COPY .build/wheels/project/ /wheels/project/
RUN pip install --no-deps /wheels/project/vkernel-*.whl && pip check && rm -rf /wheels
USER vkernel:vkernel
