{#- The install panel's fetch() snippet (not autoescaped: a .js template; the page escapes it
    when it shows it). The action is JSON, so any URL is one string literal. -#}
const form = document.querySelector('form[action={{ action|tojson }}]');
form.addEventListener('submit', async (event) => {
  event.preventDefault();
  const response = await fetch({{ action|tojson }}, {
    method: 'POST',
    body: new FormData(form),
    headers: { 'Accept': 'application/json' },
  });
  const result = await response.json();
  // result.ok === true (result.id names the submission), or result.error.message says why
  // and, for answers that need fixing (422), result.errors = { field: ['message', ...] }
});
