# PostgreSQL 15 for the replicas profile (docker/docker-compose.replicas.yml): Debian's server package
# on the same base image as fedpers (no other image is pulled). Build context: docker/.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
EXPOSE 5432
HEALTHCHECK --interval=2s --timeout=3s --retries=30 CMD ["pg_isready", "-h", "127.0.0.1", "-U", "fedpers", "-d", "fedpers"]
ENTRYPOINT ["sh", "/usr/local/bin/postgres-entrypoint.sh"]
