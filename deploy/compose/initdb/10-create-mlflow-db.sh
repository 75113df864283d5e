#!/bin/bash
# Runs once, when the Postgres volume is first initialised (docker-entrypoint-initdb.d).
# POSTGRES_DB (the Dagster database) is created by the image itself; this adds the MLflow
# database, owned by its own role, so the two services never share tables or credentials.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v mlflow_user="$MLFLOW_DB_USER" -v mlflow_password="$MLFLOW_DB_PASSWORD" \
  -v mlflow_db="$MLFLOW_DB_NAME" <<'SQL'
CREATE ROLE :"mlflow_user" LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE :"mlflow_db" OWNER :"mlflow_user";
SQL
