(function(){var host=new URL(document.currentScript.src).origin;function url(m,s2s){return s2s?host+'/api/s/s2s/'+m:host+'/api/s/'+m}window.__jitsuTest={url:url};})();
