# scriptlb with its default config (a balancer on :8080 over three demo backends), as a
# non-root user. Build: docker build -t scriptlb .   Run: docker run -p 8080:8080 scriptlb
# Use your own config: -v $PWD/conf:/srv/scriptlb/conf:ro (it must `listen` on 0.0.0.0 to be
# reachable from outside the container, and keep `daemon off;`).
FROM python:3.11-slim

RUN useradd --system --home-dir /srv/scriptlb --shell /usr/sbin/nologin scriptlb
WORKDIR /opt/scriptlb-src
COPY pyproject.toml README.md ./
COPY scriptlb ./scriptlb
COPY conf ./conf
COPY hooks ./hooks
# the package-data links (scriptlb/data/conf, /hooks) point at conf/ and hooks/ copied above
RUN pip install --no-cache-dir . && rm -rf /opt/scriptlb-src

# the prefix: conf/ and hooks/ from the package, logs/ and shared_dicts/ written at run time
WORKDIR /srv/scriptlb
RUN cp -r "$(python -c 'import scriptlb.config as c; print(c.package_prefix())')"/. . \
    && sed -i 's/listen 127.0.0.1:8080;/listen 8080;/' conf/scriptlb.conf \
    && mkdir -p logs && chown -R scriptlb:scriptlb /srv/scriptlb
USER scriptlb
EXPOSE 8080
STOPSIGNAL SIGQUIT
CMD ["scriptlb", "-p", "/srv/scriptlb"]
