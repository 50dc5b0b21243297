# The bonewatch production image: the official Airflow image with bonewatch and its run-time
# dependencies (requirements.runtime.lock: no pytest, playwright, duckdb, ruff, hypothesis...).
# docker-compose.yml builds it once (`docker compose build`) instead of pip-installing at every
# container start. Keep the tag equal to apache-airflow in requirements.lock (a test checks).
FROM apache/airflow:3.3.2-python3.11

# The lock pins apache-airflow==3.3.2 itself, so pip cannot move Airflow while installing the rest
# (what the image's docs ask of "pip install" on top of it).
COPY --chown=airflow:0 requirements.runtime.lock /opt/bonewatch/requirements.runtime.lock
RUN pip install --no-cache-dir -r /opt/bonewatch/requirements.runtime.lock

# The package, installed editable from /opt/bonewatch: bonewatch.store.db finds the Alembic
# migrations at <plugins>/../sql, and the `bonewatch` command (the `serve` service) comes with it.
COPY --chown=airflow:0 pyproject.toml README.md /opt/bonewatch/
COPY --chown=airflow:0 sql /opt/bonewatch/sql
COPY --chown=airflow:0 plugins /opt/bonewatch/plugins
RUN pip install --no-cache-dir --no-deps -e /opt/bonewatch

# The DAG files (thin: every task calls the package). Rebuild the image after changing them.
COPY --chown=airflow:0 dags /opt/airflow/dags
