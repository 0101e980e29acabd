// The chat page of `pagedllm serve --ui`: plain JS, no build step. It keeps the conversation in
// memory, sends it to /v1/chat/completions with stream=true, reads the server-sent events from
// the fetch body as they arrive, and aborts the request (AbortController) on Stop.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

$("api-key").value = localStorage.getItem("pagedllm-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("pagedllm-api-key", $("api-key").value);
  loadModels();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  const select = $("model");
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) throw new Error(await errorText(r));
    const data = await r.json();
    select.replaceChildren(...data.data.map((m) => new Option(m.id, m.id)));
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "Could not list models: " + e.message;
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let tokens = 0;
  const body = {
    model: $("model").value,
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          for (const choice of chunk.choices || []) {
            const piece = choice.delta && choice.delta.content;
            if (piece) {
              out.textContent += piece;
              $("log").scrollTop = $("log").scrollHeight;
            }
          }
        }
      }
    }
    const seconds = (performance.now() - started) / 1000;
    $("status").textContent = `${tokens} tokens in ${seconds.toFixed(2)} s`;
    history.push({ role: "assistant", content: out.textContent });
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
      history.push({ role: "assistant", content: out.textContent });  // the partial answer
    } else {
      history.pop();  // the failed turn is not part of the conversation
      out.className = "msg error";
      out.textContent = (out.textContent ? out.textContent + "\n" : "") + "error: " + e.message;
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  history.length = 0;
  $("log").replaceChildren();
  $("status").textContent = "";
});
loadModels();
