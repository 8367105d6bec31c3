# Reads the request (ignored here) and answers with the next event and a new context.
cat > /dev/null
echo '{"event": "gathered", "context": {"rows": 42}}'
